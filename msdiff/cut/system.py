"""`CUTSystem`: CUT and FastCUT unpaired translation (Park et al., ECCV 2020) with Lightning.

Objective (paper Eq. 5, official code's weighting):

    L_G = lambda_GAN * L_GAN(G, D) + lambda_NCE * mean(PatchNCE(A, G(A)), PatchNCE(B, G(B)))   (CUT)
    L_G = lambda_GAN * L_GAN(G, D) + lambda_NCE * PatchNCE(A, G(A))                           (FastCUT)

with PatchNCE (Eq. 3) averaged over the NCE layers and patches, L_GAN the LSGAN loss, and
L_D = (L_GAN(D(B), real) + L_GAN(D(G(A)), fake)) / 2. Each iteration takes one D step and then
one joint G+F step (manual optimisation, three Adam optimizers as in the reference). CUT sets
lambda_NCE 1 with the identity term (`nce_idt`); FastCUT lambda_NCE 10, no identity term and
the flip-equivariance augmentation (G is fed a horizontally mirrored batch half of the time and
the output features are mirrored back before PatchNCE).

DDP: each rank computes PatchNCE on its own images (the reshape uses the per-device batch) and the
gradients of G, D and F are averaged over ranks; since the D step and the G+F step each leave some
parameters without gradient, the strategy must be `ddp_find_unused_parameters_true`.

Reproducibility: the patch locations and the flip decision come from a CPU generator seeded by
(seed, iteration, rank), so a resume continues bit for bit; the learning-rate schedules are pure
functions of their step counters, and all three optimizers and schedulers live in the
checkpoint. Lightning's `trainer.global_step` counts optimizer steps, i.e. THREE per iteration
(D, G, F): `max_steps = 3 * iterations`. The keys of PatchNCE are detached in the reference, so
they are computed under `torch.no_grad` here (same gradients, less memory).
"""
from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from msdiff.cut.losses import GAN_LOSSES, gan_loss, patch_nce_loss
from msdiff.cut.networks import PatchDiscriminator, PatchSampleMLP, ResnetGenerator
from msdiff.systems.ema import EMA
from msdiff.utils import make_generator, mix_seed, to_symmetric_range, to_unit_range

OPTIMIZERS_PER_ITERATION = 3


def linear_decay(tick: int, n_constant: int, n_decay: int) -> float:
    """Reference 'linear' rule: factor 1 for ticks 0..n_constant-1, then
    1 - (tick + 1 - n_constant) / (n_decay + 1), reaching 1 / (n_decay + 1) at the last tick."""
    return 1.0 - max(0, tick + 1 - n_constant) / float(n_decay + 1)


class CUTSystem(pl.LightningModule):
    """Generator G, discriminator D and patch head F of CUT / FastCUT, with their optimizers.

    Args:
        in_channels, out_channels: image channels of domains A and B.
        ngf, n_blocks: generator width and number of res blocks (reference 64, 9).
        ndf, n_layers_d: discriminator width and depth (reference 64, 3).
        nce_layers: generator module indices tapped for PatchNCE (reference 0, 4, 8, 12, 16).
        num_patches: patch locations sampled per layer (256); netf_nc: F's embedding size (256).
        nce_t: PatchNCE temperature tau (0.07).
        nce_includes_all_negatives_from_minibatch: negatives from the whole local minibatch.
        lambda_gan: weight of the adversarial term (1). lambda_nce: weight of PatchNCE (CUT 1,
            FastCUT 10). nce_idt: add the identity PatchNCE on domain B (CUT yes, FastCUT no).
        flip_equivariance: FastCUT's flip-equivariance augmentation.
        gan_mode: 'lsgan' (reference) or 'nonsaturating'.
        lr, beta1, beta2: Adam settings for G, D and F (2e-4, 0.5, 0.999).
        n_epochs, n_epochs_decay: constant learning rate for n_epochs, then linear decay to ~0 over
            n_epochs_decay (CUT 200 + 200, FastCUT 150 + 50); set `trainer.max_epochs` to the sum.
        lr_interval: 'epoch' (reference) or 'step' (then n_epochs/n_epochs_decay count iterations).
        ema_decay: keep an EMA of G with this decay (None: no EMA); validation and translation
            use it when present.
        seed: seed of the per-iteration patch/flip generators.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_blocks: int = 9,
                 ndf: int = 64, n_layers_d: int = 3, nce_layers: Sequence[int] = (0, 4, 8, 12, 16),
                 num_patches: int = 256, netf_nc: int = 256, nce_t: float = 0.07,
                 nce_includes_all_negatives_from_minibatch: bool = False, lambda_gan: float = 1.0,
                 lambda_nce: float = 1.0, nce_idt: bool = True, flip_equivariance: bool = False,
                 gan_mode: str = "lsgan", lr: float = 2e-4, beta1: float = 0.5, beta2: float = 0.999,
                 n_epochs: int = 200, n_epochs_decay: int = 200, lr_interval: str = "epoch",
                 ema_decay: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if gan_mode not in GAN_LOSSES:
            raise ValueError(f"gan_mode: expected one of {sorted(GAN_LOSSES)}, got {gan_mode!r}")
        if lr_interval not in ("epoch", "step"):
            raise ValueError(f"lr_interval: expected 'epoch' or 'step', got {lr_interval!r}")
        if n_epochs < 0 or n_epochs_decay < 0 or num_patches < 1 or nce_t <= 0 or lr <= 0:
            raise ValueError(f"CUTSystem: expected n_epochs, n_epochs_decay >= 0, num_patches >= 1, nce_t > 0, lr > 0;"
                             f" got {n_epochs}, {n_epochs_decay}, {num_patches}, {nce_t}, {lr}")
        nce_layers = tuple(int(i) for i in nce_layers)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.G = ResnetGenerator(in_channels, out_channels, ngf, n_blocks)
        self.D = PatchDiscriminator(out_channels, ndf, n_layers_d)
        self.F = PatchSampleMLP(self.G.nce_channels(nce_layers), netf_nc)
        # a child module, as ScoreSystem's `ema`: its state lives under "G_ema." (net.*, num_updates)
        self.G_ema = EMA(self.G, ema_decay) if ema_decay is not None else None
        self.nce_layers, self.num_patches, self.nce_t = nce_layers, num_patches, nce_t
        self.negatives_from_minibatch = nce_includes_all_negatives_from_minibatch
        self.lambda_gan, self.lambda_nce, self.nce_idt = lambda_gan, lambda_nce, nce_idt
        self.flip_equivariance, self.gan_mode, self.seed = flip_equivariance, gan_mode, seed

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        betas = (hp.beta1, hp.beta2)
        opts = [torch.optim.Adam(m.parameters(), lr=hp.lr, betas=betas) for m in (self.G, self.D, self.F)]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor) for o in opts]
        return opts, [{"scheduler": s, "interval": "step"} for s in scheds]

    def _lr_factor(self, k: int) -> float:
        """Learning-rate factor after k scheduler steps (one per iteration): the reference linear
        rule on the epoch index k // batches_per_epoch, or on k itself with lr_interval 'step'."""
        hp = self.hparams
        tick = k
        if hp.lr_interval == "epoch" and k > 0:
            per_epoch = self.trainer.num_training_batches
            if per_epoch == float("inf"):
                raise ValueError("lr_interval: 'epoch' needs a sized train loader; use lr_interval: step")
            tick = k // int(per_epoch)
        return linear_decay(tick, hp.n_epochs, hp.n_epochs_decay)

    def on_fit_start(self) -> None:
        """Under DDP, each backward (D step, then G+F step) leaves the other networks' parameters
        without gradients, which DDP only accepts with `find_unused_parameters=True`."""
        ddp = self.trainer.strategy.model
        if isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters:
            raise ValueError("trainer.strategy: CUT under DDP needs ddp_find_unused_parameters_true "
                             "(or ddp_spawn_/ddp_fork_find_unused_parameters_true)")

    def iteration(self) -> int:
        """Index of the current training iteration (3 optimizer steps each)."""
        return self.global_step // OPTIMIZERS_PER_ITERATION

    def nce_loss(self, src: Tensor, tgt: Tensor, flipped: bool, generator: torch.Generator) -> Tensor:
        """lambda_NCE * PatchNCE(src, tgt) averaged over layers and patches (official weighting).

        Queries: F(features of G's encoder on the output `tgt`), mirrored back when the batch was
        flipped; keys: F(features of `src`) at the same sampled locations, without gradient."""
        feat_q = self.G(tgt, self.nce_layers, encode_only=True)
        if flipped:
            feat_q = [f.flip(3) for f in feat_q]
        with torch.no_grad():
            feat_k = self.G(src, self.nce_layers, encode_only=True)
            k_pool, ids = self.F(feat_k, self.num_patches, generator=generator)
        q_pool, _ = self.F(feat_q, self.num_patches, patch_ids=ids)
        b = src.shape[0]  # the per-device batch: the NCE reshape must not use the global one
        total = sum(patch_nce_loss(q, k, b, self.nce_t, self.negatives_from_minibatch).mean()
                    for q, k in zip(q_pool, k_pool))
        return total * self.lambda_nce / len(self.nce_layers)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt_g, opt_d, opt_f = self.optimizers()
        real_a, real_b = to_symmetric_range(batch["A"]), to_symmetric_range(batch["B"])
        b = real_a.shape[0]
        g = make_generator(mix_seed(self.seed, self.iteration(), self.global_rank))
        flipped = self.flip_equivariance and bool(torch.rand((), generator=g) < 0.5)  # CPU: no device sync
        use_idt = self.nce_idt and self.lambda_nce > 0
        real = torch.cat([real_a, real_b]) if use_idt else real_a
        if flipped:
            real = real.flip(3)
        fake = self.G(real)
        fake_b, idt_b = fake[:b], (fake[b:] if use_idt else None)

        # D step: fake detached, (real + fake) / 2
        self.D.requires_grad_(True)
        loss_d_fake = gan_loss(self.gan_mode, self.D(fake_b.detach()), False).mean()
        loss_d_real = gan_loss(self.gan_mode, self.D(real_b), True).mean()
        loss_d = 0.5 * (loss_d_fake + loss_d_real)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()

        # G + F step, D frozen
        self.D.requires_grad_(False)
        loss_g_gan = gan_loss(self.gan_mode, self.D(fake_b), True).mean() * self.lambda_gan
        loss_nce = self.nce_loss(real_a, fake_b, flipped, g) if self.lambda_nce > 0 else fake_b.new_zeros(())
        loss_nce_both = 0.5 * (loss_nce + self.nce_loss(real_b, idt_b, flipped, g)) if use_idt else loss_nce
        loss_g = loss_g_gan + loss_nce_both
        opt_g.zero_grad(set_to_none=True)
        opt_f.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        opt_f.step()
        self.D.requires_grad_(True)
        for sched in self.lr_schedulers():
            sched.step()
        if self.G_ema is not None:
            self.G_ema.update(self.G)

        self.log_dict({"train/loss_D": loss_d.detach(), "train/loss_G_GAN": loss_g_gan.detach(),
                       "train/loss_NCE": loss_nce.detach(), "train/loss_G": loss_g.detach()},
                      on_step=True, batch_size=b)  # no prog_bar: StepProgressBar.get_metrics
        return loss_g.detach()

    # ---- translation and grids ------------------------------------------------------------------
    @property
    def generator(self) -> ResnetGenerator:
        """The generator used for translation: the EMA copy when kept, else G."""
        return self.G_ema.net if self.G_ema is not None else self.G

    @torch.no_grad()
    def translate(self, x: Tensor) -> Tensor:
        """Translate images of domain A, (B, C, H, W) in [0, 1] with H, W multiples of 4, to domain B
        in [0, 1]."""
        if x.ndim != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"translate: expected (B, C, H, W) with H and W multiples of 4, got {tuple(x.shape)}")
        return to_unit_range(self.generator(to_symmetric_range(x))).clamp(0, 1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        a, b = batch["A"], batch["B"]
        rows = torch.cat([a, self.translate(a), self.translate(b)], dim=3)  # (N, C, H, 3W): A | G(A) | G(B)
        grid = torch.cat(list(rows), dim=1)
        if self.global_rank == 0 and isinstance(self.logger, TensorBoardLogger):  # x-axis: iterations, as the scalars'
            self.logger.experiment.add_image("translation/A|G(A)|G(B)", grid.float().cpu(), global_step=self.iteration())
