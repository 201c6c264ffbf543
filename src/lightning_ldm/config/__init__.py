"""Config handling: the typed schema behind the yaml, and where the yaml lives."""
