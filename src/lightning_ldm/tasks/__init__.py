"""What each stage does: a function ``task(cfg)`` named by ``task.run`` in the stage's config."""
