"""`ScoreSystem`: training of a conditional score model (Batzolis et al. 2021, MSDiff) with Lightning.

One system trains every estimator of the paper (CDE, CDiffE, CMDE, VS-CMDE): it holds the shared
network, the estimator (which owns the SDE(s) and the loss) and the reference optimiser settings
(Adam 2e-4, betas (0.9, 0.999), eps 1e-8, linear warm-up over 2,500 steps, gradient-norm clip 1.0,
EMA 0.999 with warm-up min(decay, (1 + n) / (10 + n)), n counting the update being made).

Reproducibility contract (what makes a resume bitwise exact):
  * the loss noise comes from a generator seeded from (seed, global_step, rank), and the global
    torch RNG (dropout) is re-seeded from the same triple before every step, so nothing depends on
    RNG state carried across a resume;
  * the EMA and VS-CMDE's sigma_max_y are updated inside ``optimizer_step``, so the checkpoint
    taken at step N holds both as of step N; both are sub-modules/buffers, hence in ``state_dict``.

Checkpoints of train.py carry ``checkpoint["msdiff"] = {"model": {class_path, init_args}, "data":
{...}, "version": ...}`` (`msdiff.run.RecordConfig`); `msdiff.run.TrainedRun` rebuilds the system,
its task and its data from the checkpoint file alone (Lightning's `ScoreSystem.load_from_checkpoint`
rebuilds the system too).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from msdiff.data import ConditionalDataModule
from msdiff.estimators import ConditionalEstimator
from msdiff.nn.unet import UNet
from msdiff.samplers import Sampler
from msdiff.systems.ema import EMA
from msdiff.systems.nonfinite import NonFiniteGuard, NonFiniteLossError
from msdiff.train_feedback import grid_metrics, is_logging_step, log_hparams_tab, run_hparams
from msdiff.utils import Generators, make_generator, mix_seed

__all__ = ["ScoreSystem"]


class ScoreSystem(pl.LightningModule):
    """Network + estimator + optimiser settings of a conditional score model.

    Args:
        net: the score network (``msdiff.nn.unet.UNet``), called as ``net(x, noise_label)``.
        estimator: an ``msdiff.estimators`` estimator (CDE, CDiffE, CMDE, VSCMDE); it owns the SDE(s)
            and defines ``loss_terms``/``score_fn``/``sampling_sde``. An estimator with an
            ``update(step)`` method (VS-CMDE) is advanced after every optimizer step.
        lr, betas, eps, weight_decay: Adam settings (reference: 2e-4, (0.9, 0.999), 1e-8, 0).
        warmup_steps: linear learning-rate warm-up, lr * min(1, k / warmup_steps) at optimizer step k
            (k = 0, 1, ...; the reference's ``step / warmup``: its first step has lr 0).
        grad_clip: maximum global gradient norm (0 disables clipping; the norm is logged either way).
        ema_decay: EMA decay of the network (0.999); validation and sampling use the EMA weights.
        sampler: a fast ``msdiff.samplers`` sampler for the validation sample grids
            (None: no grids). Grids are drawn every ``trainer.val_check_interval`` steps.
        sample_grid_size: number of validation examples shown in a grid.
        sample_draws: draws per example in the validation grid ([y | K draws | x], as sample.py's
            grids); the grid's PSNR, SSIM, consistency and (K > 1) diversity are logged as val/*.
        x_channels: channels of the target image x (3 for RGB); samples are drawn with this shape.
        seed: seed of the per-step noise generators and of the sample grids.
        channels_last, compile: GPU speed switches (channels-last memory format, ``torch.compile``
            of the training forward).
        bf16: deprecated alias of ``--trainer.precision bf16-mixed`` (Lightning's mixed precision,
            which is how to choose the precision); it still autocasts the forward to bfloat16 and warns.
    """

    def __init__(
        self,
        net: UNet,
        estimator: ConditionalEstimator,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 2500,
        grad_clip: float = 1.0,
        ema_decay: float = 0.999,
        sampler: Optional[Callable] = None,
        sample_grid_size: int = 8,
        sample_draws: int = 1,
        x_channels: int = 3,
        seed: int = 0,
        channels_last: bool = False,
        bf16: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        for name, v in (("lr", lr), ("eps", eps)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v}: expected a positive number")
        if warmup_steps < 0 or grad_clip < 0 or weight_decay < 0:
            raise ValueError(f"warmup_steps={warmup_steps}, grad_clip={grad_clip}, weight_decay={weight_decay}: expected >= 0")
        if sample_grid_size < 1:
            raise ValueError(f"sample_grid_size={sample_grid_size}: expected >= 1")
        if isinstance(sample_draws, bool) or int(sample_draws) != sample_draws or sample_draws < 1:
            raise ValueError(f"sample_draws={sample_draws}: expected an integer >= 1")
        # The hyperparameters are the constructor's. Built in Python, net/estimator/sampler are objects
        # (a weights_only checkpoint cannot hold them); built by LightningCLI (train.py), whose saved
        # hyperparameters carry its "_instantiator", they are the config's {class_path, init_args}
        # dicts, so that Lightning's `ScoreSystem.load_from_checkpoint(path)` rebuilds the whole system.
        self.save_hyperparameters(ignore=["net", "estimator", "sampler"])
        if "_instantiator" in self.hparams:
            self.save_hyperparameters()
        self.sample_draws = int(sample_draws)
        self.net = net
        self.estimator = estimator
        self.ema = EMA(net, ema_decay)
        self.sampler = sampler
        self.lr, self.betas, self.adam_eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.warmup_steps, self.grad_clip = int(warmup_steps), float(grad_clip)
        self.sample_grid_size, self.x_channels, self.seed = int(sample_grid_size), int(x_channels), int(seed)
        if bf16:
            warnings.warn("model.init_args.bf16 is deprecated: use --trainer.precision bf16-mixed "
                          "(Lightning's mixed precision)", DeprecationWarning, stacklevel=2)
        self.channels_last, self.bf16, self.compile_net = bool(channels_last), bool(bf16), bool(compile)
        self._train_forward: Callable = net  # replaced by a compiled wrapper in setup() if asked
        self._t_last: Optional[float] = None  # host time and images since the last logging step
        self._images = 0
        self._last_loss: Optional[Tensor] = None
        self._guard = NonFiniteGuard()

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.ema.net.to(memory_format=torch.channels_last)
        if self.compile_net and stage == "fit":
            self._train_forward = torch.compile(self.net)

    def on_fit_start(self) -> None:
        if self.trainer.max_steps and self.trainer.max_steps > 0:  # fail now, not at step 354k
            self.estimator.check_schedule(self.trainer.max_steps)
        if self.global_rank == 0:  # TensorBoard's HPARAMS tab (issue 14): also the estimator, SDEs, network size, sampler
            shown = {k: v for k, v in self.hparams.items() if not k.startswith("_") and not isinstance(v, dict)}
            log_hparams_tab(self.logger, {**shown, **run_hparams(self.net, self.estimator, self.sampler)})

    def configure_optimizers(self):
        # fused=True: one kernel for all parameters (3x faster than the per-tensor loop on CPU)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=self.betas, eps=self.adam_eps,
                               weight_decay=self.weight_decay, fused=True)
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if warm == 0 else min(1.0, k / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- training ---------------------------------------------------------------------------------
    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _prep(self, batch: dict) -> tuple[Tensor, Tensor]:
        x, y = batch["x"], batch["y"]
        if self.channels_last:
            x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
        return x, y

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws from the global RNG: re-seed it from (seed, step, rank) so a resumed run
        # draws exactly what an uninterrupted one would.
        torch.manual_seed(mix_seed(self.seed, self.global_step, self.global_rank) ^ 0x5EED)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x, y = self._prep(batch)
        g = make_generator(mix_seed(self.seed, self.global_step, self.global_rank), x.device)
        with self._autocast():
            terms = self.estimator.loss_terms(self._train_forward, x, y, generator=g)
        loss = terms["loss"].float().mean()
        self._last_loss = loss.detach()
        bs = x.shape[0]
        self.log("train/loss", loss, batch_size=bs)  # no prog_bar: StepProgressBar.get_metrics
        for k in ("loss_x", "loss_y"):
            if terms.get(k) is not None:
                self.log(f"train/{k}", terms[k].float().mean(), batch_size=bs)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping (reference: 1.0) and the non-finite guard (``msdiff.systems.nonfinite``).

        No host sync here: a step whose loss or gradient norm is not finite is skipped on the device
        by the fused Adam kernel, and the guard's flag is read every ``trainer.log_every_n_steps``
        steps and before every checkpoint, which then stops training (``NonFiniteLossError``). In
        DDP the gradients are already averaged, so every rank sees the same norm and skips alike.
        """
        if gradient_clip_val:
            raise ValueError("trainer.gradient_clip_val: leave it unset; the clip is model.init_args.grad_clip")
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        self.log("train/grad_norm", norm, batch_size=1)
        loss = self._last_loss if self._last_loss is not None else norm.new_zeros(())
        self._guard.skip_if_nonfinite(optimizer, loss, norm, self.global_step)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.ema.update(self.net)
        # VS-CMDE's schedule; Lightning counts this step only after the hook returns: it is step k + 1
        self.estimator.set_step(self.trainer.global_step + 1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``trainer.log_every_n_steps`` steps (when the logger writes): the guard's check and
        the host-side scalars. A Python number passed to ``self.log`` becomes a device tensor (a
        host-to-device copy, which waits for the GPU), so they are not logged on the other steps;
        images/s is the rate over the whole interval, which ends at the guard's synchronisation."""
        self._images += batch["x"].shape[0] * self.trainer.world_size
        if not is_logging_step(self.trainer):
            return
        self._guard.check()
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/images_per_sec", self._images / max(now - self._t_last, 1e-9), batch_size=1)
        self._t_last, self._images = now, 0
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        for name, value in self.estimator.schedule_values().items():  # VS-CMDE's sigma_max_y
            self.log(f"train/{name}", value, batch_size=1)

    # ---- validation and sampling -------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = self._prep(batch)
        g = make_generator(mix_seed(self.seed, 2**31 + batch_idx, self.global_rank), x.device)
        with torch.no_grad(), self._autocast():
            loss = self.estimator.loss(self.ema.net, x, y, generator=g).float().mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        # the x-axis of the val/* scalars (Lightning's logger takes a logged "step"): the optimizer step
        # the weights have, as the grid's (Lightning would write them one step earlier, at 249 for 250)
        self.log("step", float(self.global_step), batch_size=x.shape[0])
        if batch_idx == 0 and self.sampler is not None and self.global_rank == 0:
            dm, mask = self._data_module(), None
            if dm is not None:  # the same batch on every call
                b = dm.fixed_batch(self.sample_grid_size)
                x, y = b["x"].to(self.device), b["y"].to(self.device)
                mask = b["mask"].to(self.device) if "mask" in b else None
            n = self.sample_grid_size
            self.log_sample_grid(x[:n], y[:n], None if mask is None else mask[:n])

    @torch.no_grad()
    def sample(self, y: Tensor, sampler: Sampler, generator: Generators = None,
               use_ema: bool = True) -> Tensor:
        """Draw x ~ p(x | y) with ``sampler`` and the EMA (or raw) network (the prior -> score ->
        sampler composition of `msdiff.guidance.base.Guidance.sample`); returns x in [0, 1]."""
        from msdiff.guidance.base import Unguided

        net = self.ema.net if use_ema else self.net
        x = Unguided().sample(self.estimator, net, y, sampler, self.x_channels, generator=generator)
        return x.clamp(0.0, 1.0)

    def log_sample_grid(self, x: Tensor, y: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        """Sample the fixed validation batch `sample_draws` times, log the [y | draws | x] grid
        (`msdiff.images.sample_grid`, the grid of sample.py) to TensorBoard and the draws' PSNR, SSIM,
        consistency and diversity (`msdiff.train_feedback.grid_metrics`) as val/* scalars."""
        from msdiff.images import sample_grid

        draws = torch.stack([self.sample(y.float(), self.sampler, generator=make_generator(self.seed + k, x.device))
                             for k in range(self.sample_draws)])  # (K, B, C, H, W); draw 0 as before
        dm = self._data_module()
        values = grid_metrics(draws.float(), y.float(), x.float(), None if dm is None else dm.task, mask)
        for name, v in values.items():
            self.log(f"val/{name}", v, rank_zero_only=True, batch_size=x.shape[0])
        grid = sample_grid(y.float().cpu(), draws.float().cpu(), x.float().cpu())
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_image("samples/y|draws|x", grid, global_step=self.global_step)
        return grid

    def _data_module(self) -> Optional[ConditionalDataModule]:
        """The trainer's data module when it is msdiff's (its fixed validation batch and task)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return dm if isinstance(dm, ConditionalDataModule) else None

    # ---- checkpoints ------------------------------------------------------------------------------
    def on_train_end(self) -> None:
        self._guard.check()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._guard.check()  # raises before anything is written when a skipped step was non-finite
