"""What train.py shows while a run goes: progress over max_steps, the validation grid's metrics, the
hyperparameters a researcher compares across runs, and less console noise.

* `StepProgressBar`: one bar over `trainer.max_steps` optimizer steps (runs are defined in steps,
  e.g. 500k, not epochs), starting at the resumed step, with an ETA; the epoch is in its label.
* `run_hparams(net, estimator, sampler)`: flat, TensorBoard-friendly values (estimator, SDEs with
  sigma_max_x / sigma_max_y, VS-CMDE's target and step, network size, validation sampler) that
  `ScoreSystem` shows next to its hyperparameters in TensorBoard's HPARAMS tab (through the logger:
  its hyperparameters stay the constructor's).
* `grid_metrics(samples, y, x, task, mask)`: the paper's cheap metrics of the validation grid's K
  draws (PSNR, SSIM, consistency; diversity when K > 1), computed like sample.py's.
* `StepsTrainer`: Lightning's Trainer where `limit_*_batches: 1` is one batch. Lightning annotates
  them Union[float, int]: LightningCLI parsed a config's `limit_val_batches: 1` as 1.0, i.e. ALL
  validation batches.
* `ValidationRecord` and `closing_lines(...)`: what a run says when it ends (run directory,
  checkpoint, TensorBoard and sample.py commands, the last validation's metrics and step).
* `quiet_lightning()`: drops Lightning's start-up tips, the limit/interval notices, the "0 Total
  Flops" summary line and the pytree deprecation warning, keeping what a user needs (devices, seed,
  model summary, resume and stop lines).
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor, nn

from msdiff.estimators import ConditionalEstimator
from msdiff.samplers import Sampler

__all__ = ["StepProgressBar", "is_logging_step", "StepsTrainer", "run_hparams", "log_hparams_tab", "grid_metrics",
           "quiet_lightning", "ValidationRecord", "closing_lines", "steps_per_iteration"]

#: the scalars TensorBoard's HPARAMS tab shows next to each run's hyperparameters
HPARAM_METRICS = ("val/loss", "val/psnr", "val/ssim", "val/consistency", "val/diversity", "train/loss")


# ---- progress over max_steps ---------------------------------------------------------------------
def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step just done is one the logger writes (every
    ``trainer.log_every_n_steps`` steps): the only steps on which values are read back from the
    device (the non-finite guard, the progress bar's losses) or host numbers are logged."""
    return trainer.global_step % max(1, trainer.log_every_n_steps) == 0


def steps_per_iteration(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """Optimizer steps (Lightning's ``global_step``) per training iteration: 1 for an automatically
    optimised system, the number of optimizers for a manually optimised one that steps each once
    per iteration (CUT: D, G and F, so ``max_steps`` = 3 x iterations)."""
    return 1 if pl_module.automatic_optimization else max(1, len(trainer.optimizers))


def total_iterations(trainer: pl.Trainer, per_iteration: int) -> Optional[int]:
    """The run's length in iterations: ``max_steps / per_iteration``, else ``max_epochs`` x the
    batches of an epoch when both are known; None when neither bounds the run."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps // per_iteration
    batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and batches != float("inf"):
        return int(trainer.max_epochs * batches) // max(1, trainer.accumulate_grad_batches)
    return None


class StepProgressBar(TQDMProgressBar):
    """TQDM progress over training iterations: n = trainer.global_step / `steps_per_iteration` of
    `total_iterations` (``max_steps``, or ``max_epochs`` x batches), so a CUT run's bar ends at its
    iterations as TensorBoard's x-axis does; ETA from the steps done in this process (a resumed run
    starts at its step); validation keeps Lightning's inner bar."""

    _per_iteration = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._per_iteration = steps_per_iteration(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=total_iterations(trainer, self._per_iteration))
        bar.initial = bar.n = trainer.global_step // self._per_iteration
        bar.unit = "step" if self._per_iteration == 1 else "it"
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:  # one bar for the whole run
        self.train_progress_bar.set_description(f"Training (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, n = self.train_progress_bar, trainer.global_step // self._per_iteration
        if bar is None:
            return
        if self._should_update(n, bar.total) and not bar.disable:
            bar.n = n
            bar.refresh()
        if is_logging_step(trainer):  # the logger reads the scalars then anyway
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the postfix follows the logged scalars (no extra device read at an epoch's end)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Union[int, str, float]]:
        """Lightning's bar metrics plus the training losses (``train/loss*``) as last logged. The
        systems log them without ``prog_bar``: Lightning converts every progress-bar metric to a
        Python number after each step, a host-device synchronisation per step on a GPU; here they
        are read every ``trainer.log_every_n_steps`` steps, when the logger reads them too."""
        metrics = super().get_metrics(trainer, pl_module)
        losses = {name: value.detach().float().reshape(()) for name, value in trainer.callback_metrics.items()
                  if name.startswith("train/loss") and isinstance(value, Tensor) and value.numel() == 1}
        if losses:  # one read for all of them
            metrics.update(zip(losses, torch.stack(list(losses.values())).tolist()))
        return metrics


# ---- the end of a run ---------------------------------------------------------------------------------
class ValidationRecord(pl.Callback):
    """The ``trainer.global_step`` and the ``val/*`` scalars of the last validation (the sanity check
    before training does not count), for the closing lines and for a final validation."""

    def __init__(self) -> None:
        self.step: Optional[int] = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.step = trainer.global_step
        values = {k: v for k, v in trainer.callback_metrics.items()
                  if k.startswith("val/") and isinstance(v, Tensor) and v.numel() == 1}
        self.metrics = dict(zip(values, torch.stack([v.float().reshape(()) for v in values.values()]).tolist())) \
            if values else {}


def closing_lines(run_dir: str, checkpoint: str, step: Optional[int], tensorboard: str, sample: str,
                  record: ValidationRecord, note: Optional[str] = None, iterations: Optional[int] = None) -> list[str]:
    """What a finished run prints: where it lives, its checkpoint and step (and ``iterations`` where
    an iteration takes several optimizer steps: CUT), how to watch it and sample from it, and the
    last validation's metrics (or `note`, why there are none)."""
    at = "" if step is None else f" (step {step}" + ("" if iterations is None else f" = {iterations} iterations") + ")"
    lines = ["", f"run directory  {run_dir}", f"checkpoint     {checkpoint}{at}",
             f"TensorBoard    {tensorboard}", f"sample         {sample}"]
    if record.metrics:
        values = ", ".join(f"{k} {v:.4g}" for k, v in sorted(record.metrics.items()))
        lines.append(f"validation     step {record.step}: {values}")
    elif note:
        lines.append(f"validation     {note}")
    elif record.step is not None:
        lines.append(f"validation     step {record.step}: the grid only (this model logs no val/* scalars)")
    return lines


# ---- integers mean batches --------------------------------------------------------------------------
class StepsTrainer(pl.Trainer):
    """`lightning.pytorch.Trainer` where `limit_{train,val,test,predict}_batches` = 1 means ONE batch
    also when it arrives as the float 1.0. Lightning reads int 1 as one batch and float 1.0 as every
    batch, but its Union[float, int] annotation makes LightningCLI parse a config's `1` as 1.0, so
    `limit_val_batches: 1` silently validated on the whole loader. For every batch, leave the key out
    (Lightning's default); fractions below 1 keep their meaning."""

    LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key in self.LIMITS:
            if isinstance(kwargs.get(key), float) and kwargs[key] == 1.0:
                kwargs[key] = 1
        super().__init__(*args, **kwargs)


# ---- hyperparameters --------------------------------------------------------------------------------
def describe(obj: Any) -> str:
    """"Class(arg=value, ...)" for the constructor arguments the object keeps under the same name."""
    import inspect

    args = [f"{k}={getattr(obj, k)!r}" for k in inspect.signature(type(obj)).parameters if k in vars(obj)]
    return f"{type(obj).__name__}({', '.join(args)})"


def run_hparams(net: nn.Module, estimator: ConditionalEstimator, sampler: Optional[Sampler]) -> dict[str, Union[int, float, str, bool]]:
    """Flat values of what distinguishes runs: "estimator", "sde_x", "sde_y" (reprs), "sigma_max_x",
    "sigma_max_y" (the speed parameter: sigma_max for VE, beta_max for VP; for VS-CMDE the start and
    "sigma_max_y_target" / "reach_target_steps"), "weighting", "preconditioning", "net_params" and
    the U-Net's "net_ch", "net_ch_mult", "net_num_res_blocks", "net_attn_resolutions",
    "net_image_size", "sampler" (`describe`) and "sampler_nfe"."""
    from msdiff.nn.unet import UNet

    hp: dict[str, Union[int, float, str, bool]] = {"estimator": type(estimator).__name__}
    hp.update(estimator.hparams_summary())
    hp["net_params"] = sum(p.numel() for p in net.parameters())
    if isinstance(net, UNet):
        hp.update(net_ch=net.ch, net_ch_mult=str(list(net.ch_mult)), net_num_res_blocks=net.num_res_blocks,
                  net_attn_resolutions=str(list(net.attn_resolutions)), net_image_size=net.image_size)
    hp["sampler"] = describe(sampler) if sampler is not None else "none"
    nfe = sampler.nfe if sampler is not None else None
    if isinstance(nfe, int):
        hp["sampler_nfe"] = nfe
    return hp


def log_hparams_tab(logger: Any, hparams: dict[str, Any], metrics: tuple[str, ...] = HPARAM_METRICS) -> bool:
    """Write the hparams summary (TensorBoard's HPARAMS tab) of `hparams` with `metrics` as its metric
    columns (their values are the run's logged scalars). Lightning writes it only when it also logs
    an hp_metric placeholder, which train.py turns off. Returns False for a non-TensorBoard logger."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    if not isinstance(logger, TensorBoardLogger):
        return False
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    exp, ssi, sei = hparams_summary(flat, dict.fromkeys(metrics, 0.0))
    writer = logger.experiment._get_file_writer()
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)
    return True


# ---- validation-grid metrics ------------------------------------------------------------------------
def grid_metrics(samples: Tensor, y: Tensor, x: Tensor, task: Any = None, mask: Optional[Tensor] = None
                 ) -> dict[str, float]:
    """{"psnr", "ssim", "consistency", "diversity"} of K draws (K, B, C, H, W) for conditions y with
    targets x, as sample.py's evaluation (quantised samples; SSIM only for images of at least 11x11;
    consistency only with a task; diversity only when K > 1)."""
    from msdiff.metrics import ConditionalSampleMetrics

    # rank 0 alone samples the grid: no cross-process sync (the other ranks would never join it)
    m = ConditionalSampleMetrics(task=task, draws=samples.shape[0], sync_on_compute=False).to(samples.device)
    m.update(samples, y, x, mask=mask)
    values = m.compute()
    return {k: v for k in ("psnr", "ssim", "consistency", "diversity") if (v := values[k]) is not None}


# ---- console noise ----------------------------------------------------------------------------------
_DROP = re.compile(r"💡 Tip:|^`Trainer\((limit_\w+_batches|val_check_interval)=.*` was configured so|"
                   r"^(TPU|HPU) available:")
_ZERO_FLOPS = re.compile(r"\n\s*0\s+Total Flops\s*$")


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if _DROP.search(msg):
            return False
        if _ZERO_FLOPS.search(msg):  # the model summary: FLOPs are not measured here
            record.msg, record.args = _ZERO_FLOPS.sub("", msg), ()
        return True


def quiet_lightning() -> None:
    """Install the filters (idempotent) on the loggers Lightning prints its notices through."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.callbacks.model_summary", "lightning.pytorch.utilities.model_summary"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietFilter) for f in logger.filters):
            logger.addFilter(_QuietFilter())
