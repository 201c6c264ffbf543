"""Hydra sweepers of lightning_ldm, found by Hydra through the ``hydra_plugins`` namespace package.

- ``hydra/sweeper=ldm_grid``: Hydra's grid sweep (every combination of ``a=1,2 b=x,y``), where a failed
  trial is recorded and the sweep goes on, and a summary of all trials ends it.
- ``hydra/sweeper=ldm_optuna`` (``hparams_search=optuna_lr``): an Optuna study over the value the task
  returns (the best monitored checkpoint metric), stored in sqlite so that rerunning the command resumes it.

Both compose every trial before launching any, and refuse a local multirun of multi-device DDP trials
(every DDP rank would run the whole sweep again). Modules are imported by Hydra's plugin scan on every
start, so optuna and torch are imported only when a sweep runs.
"""
