"""What every lightning_ldm LightningModule shares: its own batch counter, the stop at ``max_steps``, and a
guard that stops training on a non-finite loss with a checkpoint instead of training on garbage.

Why our own counter: with manual optimisation Lightning 2.x advances ``trainer.global_step`` on every
``optimizer.step()``, so a generator and a discriminator stepping on one batch count 2. ``disc_start``,
``max_steps``, EMA warm-up and log axes must count *batches*, so they use ``batch_step``.
"""

import math
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist

from lightning_ldm.errors import ConfigError, NonFiniteLossError
from lightning_ldm.distributed import all_reduce
from lightning_ldm.training.nonfinite import NonFiniteGuard
from lightning_ldm.training.optimizer_settings import apply_configured_learning_rates
from lightning_ldm.training.replicas import differing_across_ranks
from lightning_ldm.training.rng import get_rng_states, set_rng_states


class StepCountingModule(L.LightningModule):
    def __init__(self, max_steps: int, max_train_seconds: Optional[float] = None, *,
                 lr: Optional[float] = None) -> None:
        super().__init__()
        if max_train_seconds is not None and max_train_seconds <= 0:
            raise ConfigError(f"max_train_seconds must be positive (or null), got {max_train_seconds}")
        if max_steps < 1:  # an untrained model would be exported as if it were a result
            raise ConfigError(f"max_steps must be at least 1, got {max_steps}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"module.lr must be positive, got {lr}")
        self.max_steps = max_steps
        self.max_train_seconds = max_train_seconds
        self.batch_step = 0  # training batches completed; saved in checkpoints
        self.reached_end = False  # stopped at max_steps or max_train_seconds: the run is finished
        self._resumed = False
        self.save_final_checkpoint = True  # benchmarks turn it off
        self.nonfinite = NonFiniteGuard()
        self._rng_states_to_restore: Optional[dict] = None
        self._batch_finished_uncounted = False  # between a batch's optimizer step and our counter's increment
        # Training time: fit wall time minus validation and evaluation (FID), summed over resumed segments.
        self._train_seconds_before = 0.0
        self._clock_start: Optional[float] = None
        self._evaluation_seconds = 0.0
        self._validation_start: Optional[float] = None
        self._agreed_seconds_this_batch: Optional[float] = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._batch_finished_uncounted = False
        self.batch_step += 1
        if self.batch_step >= self.max_steps or self._training_time_is_up():
            self.stop_if_nonfinite(everything=True)
            self.reached_end = True
            self.trainer.should_stop = True
            # The final state is resumable: rerunning with a larger max_steps continues from here.
            if self.save_final_checkpoint and self.trainer.default_root_dir and not self.trainer.fast_dev_run:
                self.trainer.save_checkpoint(Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt",
                                             weights_only=False)  # the full state (saying so silences a notice)

    # ----------------------------------------------------------------------------------------- training time
    TIME_CHECK_EVERY = 10  # batches: reading the clock waits for the GPU

    def _training_time_is_up(self) -> bool:
        if self.max_train_seconds is None or self.batch_step % self.TIME_CHECK_EVERY:
            return False
        seconds = self.agreed_training_seconds()  # every rank stops at the same batch (saving is collective)
        if seconds >= self.max_train_seconds and self.trainer.is_global_zero:
            print(f"Training time {seconds:.0f} s reached max_train_seconds={self.max_train_seconds:g} "
                  f"at batch {self.batch_step}; stopping")
        return seconds >= self.max_train_seconds

    def agreed_training_seconds(self) -> float:
        """``training_seconds`` of the slowest rank, the same number on every rank (a collective under DDP): what
        decisions taken on the clock use, so that no rank enters a collective the others skip. Read once per
        batch: the time-based FID schedule and max_train_seconds ask at the same batches."""
        if self._agreed_seconds_this_batch is None:
            seconds = torch.tensor(self.training_seconds(), dtype=torch.float64)
            self._agreed_seconds_this_batch = float(all_reduce(seconds, dist.ReduceOp.MAX, self.device))
        return self._agreed_seconds_this_batch

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def training_seconds(self) -> float:
        """Seconds spent training so far in this run, all segments (waits for the GPU: call it once a window)."""
        if self._clock_start is None:
            return self._train_seconds_before
        self._synchronize()
        return self._train_seconds_before + time.perf_counter() - self._clock_start - self._evaluation_seconds

    def exclude_from_training_time(self, seconds: float) -> None:
        """Evaluation inside the training loop (FID) is not training time."""
        self._evaluation_seconds += seconds

    def on_train_start(self) -> None:
        self._synchronize()
        self._clock_start, self._evaluation_seconds = time.perf_counter(), 0.0
        if self._resumed:
            for change in apply_configured_learning_rates(self):
                if self.trainer.is_global_zero:
                    print(f"Resumed at batch {self.batch_step}: {change}, as configured")
        if self.batch_step >= self.max_steps:
            print(f"Training already reached max_steps={self.max_steps}; nothing to do.")
            self.reached_end = True
            self.trainer.should_stop = True
        self._restore_rng_states()

    def on_train_end(self) -> None:
        self.stop_if_nonfinite(everything=True)  # a run that ended otherwise than at max_steps (signal, epochs)
        self.check_replicas_agree(announce=True)

    # ----------------------------------------------------------------------------------------- DDP replicas
    def replicated_networks(self) -> dict[str, torch.nn.Module]:
        """The networks DDP must keep identical on every rank; checked at each validation and at the end."""
        return {}

    def check_replicas_agree(self, announce: bool = False) -> None:
        world = self.trainer.world_size
        networks = self.replicated_networks()
        if world == 1 or not networks:
            return
        differing = differing_across_ranks(networks, self.device)
        if differing:
            raise RuntimeError(f"{', '.join(differing)} weights differ across the {world} ranks at batch "
                               f"{self.batch_step}: the replicas diverged (checkpoints hold rank 0's)")
        if announce and self.trainer.is_global_zero:
            print(f"Weights identical on all {world} ranks after {self.batch_step} batches: {', '.join(networks)}")

    # Validation (posterior samples, sample grids, FID) must not shift the training noise stream: then a run's
    # training does not depend on how often it validates, and a resumed run matches an uninterrupted one.
    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.check_replicas_agree()
        self._rng_before_validation = get_rng_states()
        self._synchronize()
        self._validation_start = time.perf_counter()

    def on_validation_end(self) -> None:
        if self._validation_start is not None and self._clock_start is not None:
            self._synchronize()
            self.exclude_from_training_time(time.perf_counter() - self._validation_start)
        self._validation_start = None
        if getattr(self, "_rng_before_validation", None) is not None:
            set_rng_states(self._rng_before_validation)
            self._rng_before_validation = None

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.stop_if_nonfinite()
        # The loggers' x axis is Lightning's count of batches, which a resume restores one off or not, depending on
        # when its loop state is reloaded relative to on_train_start; our own counter is the authority, every batch.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.batch_step
        self._agreed_seconds_this_batch = None
        # Callbacks' on_train_batch_end (a step-triggered ModelCheckpoint, FID) runs before ours: a checkpoint
        # written there holds this batch's update, so it must count this batch (see on_save_checkpoint).
        self._batch_finished_uncounted = True

    def _restore_rng_states(self) -> None:
        # After a resume: once Lightning has run its sanity check and set up (both draw random numbers), and before
        # the first batch is fetched, which draws too where a dataset draws in this process (a flip, one of an
        # image's captions): the resumed batches then get the data and the noise of the uninterrupted run.
        if self._rng_states_to_restore is not None:
            set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batch_step"] = self.batch_step + int(self._batch_finished_uncounted)
        checkpoint["training_seconds"] = self.training_seconds()
        # Every rank's RNG states (each rank draws its own noise); Lightning calls this hook on all ranks.
        # Inside validation, the state that training resumes with is the one from before validation.
        states = getattr(self, "_rng_before_validation", None) or get_rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed = True
        self.batch_step = int(checkpoint.get("batch_step", 0))
        self._train_seconds_before = float(checkpoint.get("training_seconds", 0.0))
        states = checkpoint.get("rng_states") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if rank < len(states):
            self._rng_states_to_restore = states[rank]

    # ----------------------------------------------------------------------------------------- non-finite losses
    def guard_step(self, optimizer, loss: torch.Tensor, name: str) -> torch.Tensor:
        """Call after backward, before ``optimizer.step()``: a non-finite step is skipped on the device (see
        ``nonfinite.py``); returns the device flag."""
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        return self.nonfinite.before_step(optimizer, loss, name, self.batch_step, gradients=scaler is None)

    def stop_if_nonfinite(self, everything: bool = False) -> None:
        """Raise (saving the last good state) once a skipped step's verdict reaches the host."""
        failure = self.nonfinite.first_failure(self.batch_step, everything)
        if failure is None:
            return
        batch, name, loss = failure
        path = None
        run_dir = getattr(self.trainer, "default_root_dir", None)
        if run_dir is not None:
            path = Path(run_dir) / "checkpoints" / f"nonfinite-step{batch}.ckpt"
            self._batch_finished_uncounted = False
            self.trainer.save_checkpoint(path, weights_only=False)
        what = f"{name} loss is {loss}" if not math.isfinite(loss) else f"{name} gradients are not finite (loss {loss})"
        # The weights never took the non-finite update, but the finite updates just before it are what made the
        # loss diverge: the saved state is for diagnosis, not for resuming.
        where = (f"; state saved to {path} for diagnosis (its weights are those of the last finite step, often "
                 "already damaged: resume=auto continues from checkpoints/last.ckpt, the last validation)") if path else ""
        raise NonFiniteLossError(f"{what} at batch {batch}{where}. Lower the learning rate, enable gradient "
                                 "clipping, or check the data")

    def log_learning_rates(self, optimizers: dict) -> None:
        for name, opt in optimizers.items():
            self.log(f"train/lr_{name}", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)
