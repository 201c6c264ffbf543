"""The config's learning rate holds after a resume.

Lightning restores each optimizer's param groups exactly as saved, lr included, and an LR scheduler's base
rates with them: a resumed run with a new ``module.lr`` would print and record the new value and go on training
at the old one. After the restore, the rates the module configures now are written over the restored ones,
keeping the schedule's position (warm-up factor) where it was.
"""

import torch


def _optimizers(configured) -> list[torch.optim.Optimizer]:
    """The optimizers of a ``configure_optimizers`` return value (an optimizer, a list, or Lightning's dict)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, dict):
        return [configured["optimizer"]]
    return [item["optimizer"] if isinstance(item, dict) else item for item in configured
            if isinstance(item, (dict, torch.optim.Optimizer))]


def apply_configured_learning_rates(module) -> list[str]:
    """Set every restored param group's base rate to the configured one; returns what changed, as text."""
    trainer = module.trainer
    configured = _optimizers(module.configure_optimizers())
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    changes = []
    for index, (live, fresh) in enumerate(zip(trainer.optimizers, configured)):
        for group_index, (group, fresh_group) in enumerate(zip(live.param_groups, fresh.param_groups)):
            new_base = fresh_group.get("initial_lr", fresh_group["lr"])
            old_base = group.get("initial_lr", group["lr"])
            if new_base == old_base:
                continue
            group["lr"] = group["lr"] * new_base / old_base  # the schedule's current factor times the new base
            if "initial_lr" in group:
                group["initial_lr"] = new_base
            for scheduler in schedulers:
                if scheduler.optimizer is live:
                    scheduler.base_lrs[group_index] = new_base
            name = f"optimizer {index}" + (f" group {group_index}" if len(live.param_groups) > 1 else "")
            changes.append(f"lr {old_base:g} -> {new_base:g} ({name})")
    return changes
