"""Lightning pieces that make long runs dependable on a cluster.

* :class:`AtomicCheckpointIO`: every checkpoint is written to a temporary file in the checkpoint's
  own directory, fsync'ed and ``os.replace``'d over the target (then the directory is fsync'ed), so a
  kill at any moment leaves either the old or the new file, never a truncated one, also when
  ``$TMPDIR`` is on another filesystem.
* :class:`Checkpointing`: writes ``last.ckpt`` every ``every_n_steps`` optimizer steps, at the final
  step and on preemption, always at a batch boundary; optionally keeps ``step=N.ckpt`` copies. It
  refuses to write weights that are not finite.
* :class:`Preemption`: SIGUSR1/SIGTERM only set a flag (:mod:`msdiff.signals`, from process start);
  before the first step, at the next batch boundary or inside validation all ranks agree,
  ``last.ckpt`` is saved (when there is anything new), the SLURM job is requeued (``scontrol
  requeue``) and the process exits with :data:`PREEMPTED_EXIT_CODE` (train.py does the exit). Lightning's own SLURM
  auto-requeue is disabled by train.py (it saves mid-step and deadlocks DDP).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from msdiff import signals
from msdiff.atomic_io import atomic_copy, atomic_write  # noqa: F401  (re-exported: train.py, tests)
from msdiff.checkpoint_file import keep_previous

#: Exit status of a run stopped by SIGUSR1/SIGTERM after saving last.ckpt (EX_TEMPFAIL of sysexits.h:
#: "temporary failure, try again"); the sbatch script treats it as "requeued, not failed".
PREEMPTED_EXIT_CODE = 75


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through :func:`atomic_write` (local filesystems); before a new ``last.ckpt``
    replaces the old one, the old one (if intact) becomes ``previous.ckpt``
    (:mod:`msdiff.checkpoint_file`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        keep = (lambda: keep_previous(path)) if path.name == "last.ckpt" else None  # previous.ckpt beside it
        atomic_write(path, lambda f: torch.save(checkpoint, f), before_replace=keep)


def _all_finite(module: torch.nn.Module) -> bool:
    ts = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    if not ts:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def is_final_step(trainer: pl.Trainer) -> bool:
    """Whether the training step just done is the run's last (``max_steps`` reached, or the last batch
    of the last epoch): the job is complete once its checkpoint is written."""
    step = trainer.global_step
    if trainer.max_steps is not None and trainer.max_steps > 0 and step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(max_epochs is not None and max_epochs > 0 and trainer.is_last_batch
                and trainer.current_epoch + 1 >= max_epochs)


class Checkpointing(pl.Callback):
    """Save ``<dirpath>/last.ckpt`` at batch boundaries.

    Args:
        every_n_steps: save every this many optimizer steps (and always at the final step).
        keep_every_n_steps: also keep a copy ``step=N.ckpt`` every this many steps (0: never).
        dirpath: the checkpoint folder; train.py sets ``<default_root_dir>/<name>/checkpoints``.
    """

    def __init__(self, every_n_steps: int = 1000, keep_every_n_steps: int = 0, dirpath: Optional[str] = None):
        if every_n_steps < 1 or keep_every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps}, keep_every_n_steps={keep_every_n_steps}: "
                             "expected every_n_steps >= 1 and keep_every_n_steps >= 0")
        self.every_n_steps, self.keep_every_n_steps = int(every_n_steps), int(keep_every_n_steps)
        self.dirpath = dirpath
        self._last_saved_step = -1

    @property
    def last_path(self) -> Path:
        if self.dirpath is None:
            raise ValueError("Checkpointing.dirpath is not set")
        return Path(self.dirpath) / "last.ckpt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_saved_step or trainer.fast_dev_run:
            return
        if step % self.every_n_steps == 0 or is_final_step(trainer):
            self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Write last.ckpt now (all ranks must call this; rank 0 writes); a step already saved is not
        written again (it would make previous.ckpt a copy of last.ckpt)."""
        step = trainer.global_step
        if step == self._last_saved_step:
            return self.last_path
        if not _all_finite(pl_module):
            raise FloatingPointError(f"step {step}: the weights are not finite; {self.last_path} was NOT overwritten")
        trainer.save_checkpoint(self.last_path, weights_only=False)  # the full state; silences Lightning's log line
        if self.keep_every_n_steps and step % self.keep_every_n_steps == 0 and trainer.is_global_zero:
            atomic_copy(self.last_path, self.last_path.with_name(f"step={step}.ckpt"))
        self._last_saved_step = step
        return self.last_path


class Preempted(BaseException):
    """Raised to leave ``trainer.fit`` after a preemption signal was honoured outside a training
    batch boundary (during validation); ``last.ckpt`` is saved by then. train.py turns it into exit
    status :data:`PREEMPTED_EXIT_CODE`. A BaseException, so that no ``except Exception`` swallows it."""


class Preemption(pl.Callback):
    """Graceful stop on SIGUSR1/SIGTERM (SLURM's ``--signal=USR1@N`` and its final SIGTERM).

    The handler (:mod:`msdiff.signals`, installed by train.py at process start and again at
    ``on_train_start`` over Lightning's own) only records the signal. It is honoured:

    * before the first step (received during start-up or while the checkpoint was restored): at
      ``on_train_start``, after the restore, without saving (nothing new to save);
    * at the next batch boundary: every rank learns whether any rank was signalled (one all-reduce
      per step), :class:`Checkpointing` writes ``last.ckpt`` and training stops;
    * during validation: a single process checks the flag before every network evaluation (a
      forward pre-hook, so also between the steps of a validation sample grid), saves and leaves
      ``fit`` by raising :class:`Preempted`; with several ranks the check is at every validation
      batch boundary (all ranks agree, then save together).

    Then rank 0 runs ``scontrol requeue`` when ``$SLURM_JOB_ID`` is set and train.py exits with
    :data:`PREEMPTED_EXIT_CODE`. A signal that arrives once the last step is done (during the final
    checkpoint write or the last validation) ends a complete job: no requeue, exit status 0.

    Args:
        requeue: run ``scontrol requeue`` under SLURM.
    """

    def __init__(self, requeue: bool = True):
        self.requeue = bool(requeue)
        self.triggered = False
        self._previous: dict[int, Any] = {}
        self._hooks: list = []

    @property
    def signalled(self) -> Optional[int]:
        return signals.preemption_signal()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("Preemption: not on the main thread, signal handlers not installed")
        else:
            for name in signals.PREEMPTION_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, signals.preemption_handler)
        # A SIGTERM during the restore reached Lightning's own handler too, which would raise
        # SIGTERMException later (exit 1, not 75): this callback handles it (the flag above).
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = False
        if self._agree(trainer):  # signalled during start-up or the restore: stop before the first step
            self._stop(trainer, pl_module, save=False)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}
        self._remove_hooks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _agree(self, trainer: pl.Trainer) -> bool:
        local = self.signalled is not None
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local)

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, save: bool = True) -> None:
        if is_final_step(trainer):  # every step is done: a complete job, not requeued (train.py exits 0)
            if save:
                ckpt = next((cb for cb in trainer.callbacks if isinstance(cb, Checkpointing)), None)
                if ckpt is not None:
                    ckpt.save(trainer, pl_module)
            rank_zero_info(f"preemption signal received after the last step ({trainer.global_step}): the run is "
                           "complete")
            trainer.should_stop = True
            return
        self.triggered = True
        if save:
            ckpt = next((cb for cb in trainer.callbacks if isinstance(cb, Checkpointing)), None)
            if ckpt is None:
                raise ValueError("Preemption needs a Checkpointing callback to save last.ckpt")
            path = ckpt.save(trainer, pl_module)
            rank_zero_info(f"preemption signal received: saved {path} at step {trainer.global_step}")
        else:
            rank_zero_info(f"preemption signal received before the first step (step {trainer.global_step}): "
                           "stopping, nothing new to save")
        if trainer.is_global_zero and self.requeue:
            requeue_slurm_job()
        trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.triggered or not self._agree(trainer):
            return
        self._stop(trainer, pl_module)

    # ---- validation: honoured within one network evaluation (single process) or one batch (DDP) --
    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _check_in_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.triggered or trainer.state.fn != "fit":
            return
        if not self._agree(trainer):
            return
        self._remove_hooks()
        self._stop(trainer, pl_module)
        raise Preempted(f"preempted during validation at step {trainer.global_step}")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 or trainer.sanity_checking:
            return

        def check(module, args) -> None:
            if self.signalled is not None and not self.triggered:
                self._check_in_validation(trainer, pl_module)

        self._hooks = [m.register_forward_pre_hook(check) for m in pl_module.modules() if not list(m.children())]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                                batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._check_in_validation(trainer, pl_module)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` the current SLURM job (array-aware); False when not under SLURM or failed."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        ok = subprocess.call(["scontrol", "requeue", job]) == 0
    except OSError as e:
        rank_zero_warn(f"scontrol requeue {job} failed: {e}")
        return False
    if not ok:
        rank_zero_warn(f"scontrol requeue {job} failed; the run stops anyway (resume it by re-running the command)")
    return ok
