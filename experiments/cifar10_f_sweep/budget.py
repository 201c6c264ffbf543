"""Stop a training run after a budget of *training* seconds (validation and FID excluded), for runs that must get
the same training-time budget however much their evaluations cost.

Lightning's ``Trainer(max_time=...)`` (``+trainer.max_time=DD:HH:MM:SS``) also stops a lightning_ldm run cleanly
(last.ckpt, the export and the FID callback's end-of-fit evaluation are all written), but its clock is the wall
time of the fit loop: validation and the FID evaluations count against it. Those cost more for a pixel-space
model than for one on 8x8 latents, so equal ``max_time`` would give the runs unequal training. This callback reads
the module's own training clock (``StepCountingModule.training_seconds()``, the ``perf/train_seconds`` that the
FID callback and the Throughput callback log) every ``check_every`` batches and stops once it reaches
``seconds``. The clock includes the first steps' torch.compile, as a user's run would.

Use it from the command line (``experiments/cifar10_f_sweep`` on ``PYTHONPATH``)::

    +callbacks.budget._target_=budget.TrainingTimeBudget +callbacks.budget.seconds=150
"""

import lightning as L


class TrainingTimeBudget(L.Callback):
    def __init__(self, seconds: float, check_every: int = 10) -> None:
        if seconds <= 0 or check_every < 1:
            raise ValueError(f"seconds={seconds} must be > 0 and check_every={check_every} >= 1")
        self.seconds, self.check_every = float(seconds), check_every
        self.stopped_at: tuple[int, float] | None = None  # (batch, training seconds) when the budget ran out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # Callbacks run before the module's own hook, which counts this batch: it is batch number batch_step + 1.
        completed = pl_module.batch_step + 1
        if completed % self.check_every or self.stopped_at is not None:
            return
        spent = pl_module.training_seconds()  # one GPU sync per check_every batches
        if spent >= self.seconds:
            trainer.should_stop = True
            self.stopped_at = (completed, spent)
            if trainer.is_global_zero:
                print(f"Training-time budget: {spent:.1f} s >= {self.seconds:.0f} s at batch {completed}; stopping")
