"""Asymmetric Gradient Guidance (AGG): Kwon & Ye, "Improving Diffusion-based Image Translation using
Asymmetric Gradient Guidance" (Sec. 4.2-4.3, Eqs. 13-16; hyper-parameters from App. B), written for any
SDE with Gaussian marginals x_t = a(t) x_0 + s(t) eps (VE, VP, sub-VP), not only DDPM's sqrt(abar).

Notation. score = score_fn(x_t, t); the network's noise and Tweedie estimates are

    eps = -s * score,        x0_hat = (x_t - s eps) / a = (x_t + s^2 score) / a.           (paper Eq. 4)

`AGGSampler` is the algorithm on one batch (its losses hold that batch's targets); `sample.py
--guidance AGG` is `msdiff.guidance.agg.AGG`, which builds one per batch from its options.

Algorithm (one call `agg(score_fn, sde, x_src)`):

1. Deterministic DDIM inversion (Eq. 16) of x_src on a grid t_0 = sde.eps < ... < t_N = t_start,
   x_{t_{j+1}} = a(t_{j+1}) x0_hat(x_{t_j}) + s(t_{j+1}) eps(x_{t_j}); x0_hat*(t_j) is kept for the t_edit
   times the guided steps will visit, and only until they have used it.
2. Reverse pass from the inverted latent. The first t_edit steps are guided (Eq. 13 with the hybrid
   update of Sec. 4.2):
     - loss L(x0) = lambda_reg * L1(x0, x0_hat*(t)) + sum_k loss_k(x0)                     (Eq. 15)
     - MCG gradient g = grad_{x_t} L(x0_hat(x_t)) through the score network.
     - Eq. 12 perturbs the noise estimate, eps~ = eps + s g (the paper's s_t = sqrt(1 - abar), which is
       s(t) here), so x0' = x0_hat(eps~) = x0_hat - (s^2 / a) g. For VP, s^2 / a = (1 - abar)/sqrt(abar),
       the paper's coefficient. In score terms this is score~ = score - g, i.e. guidance towards
       p_t(x) exp(-L(x0_hat(x))). (Eq. 14 prints eps - s g; that sign would ascend L, a typo.)
     - DDS step (Eq. 8): `adam_steps` real Adam steps (lr, betas (0.9, 0.999), eps 1e-8, fresh state
       each time step) on an additive offset b that minimise L(x0' + b) without the network.
     - the asymmetric update: the guided x0 with the UNGUIDED eps,
         x_{t'} = a(t') (x0' + b) + sqrt(s(t')^2 - sigma^2) eps + sigma z.                     (Eq. 13)
   The remaining steps are plain DDIM, x_{t'} = a(t') x0_hat + sqrt(s(t')^2 - sigma^2) eps + sigma z.
   sigma is the general-(a, s) DDIM noise, eta * s(t') G / s(t) with G^2 = s(t)^2 - (a(t)/a(t'))^2 s(t')^2
   the forward transition variance (for VP this is DDIM's eta sqrt((1-abar')/(1-abar)) sqrt(1-abar/abar')):
   every step is `msdiff.samplers.ddim_step`, the DDIM sampler's own.
3. With every loss weight zero, g = 0 and the Adam gradient is 0 (so b = 0): AGG is exactly DDIM
   inversion followed by DDIM reconstruction, and with eta = 0 returns x_src up to the discretisation
   error of DDIM (the output is x at t_0 = sde.eps, where the inversion started).

Choices where the paper is silent: the grid is uniform in t; at t_N the stored target is the reverse
pass's own x0_hat (x_{t_N} IS the inverted latent, so this equals an extra inversion evaluation at
t_N); losses are per example, so a batch is a set of independent translations. The official code
returns the offset from before its optimizer step (for adam_steps = 1 a no-op); `code_compat=True`
reproduces that: b is the offset before the last Adam step. The paper's experiments use eta = 0.8
("sigma_t = 0.8"), 60 steps, t_edit = 20, lambda = 200 and 1-2 Adam steps; eta defaults to 0 here so
that zero weights reconstruct the source.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from msdiff.guidance.losses import ConsistencyLoss, DinoClsLoss, MSELoss, RangeLoss, StatisticsLoss, l1
from msdiff.samplers import ddim_step
from msdiff.utils import Generators, append_dims

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Loss = Callable[[Tensor], Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class GuidedStep(NamedTuple):
    """One guided reverse step: the next sample and the three clean-image estimates of the step."""

    x_next: Tensor  # x at the next (lower) time
    x0_hat: Tensor  # Tweedie estimate of the unguided network
    x0_mcg: Tensor  # after the MCG step, x0' = x0_hat - (s^2/a) g
    x0_final: Tensor  # after the Adam (DDS) steps, x0'' = x0' + b
    eps: Tensor  # the unguided noise estimate used by the asymmetric update


class AGGSampler:
    """Asymmetric Gradient Guidance sampler (Kwon & Ye, Sec. 4.2, Eq. 13); see the module docstring.

    Args:
        steps: reverse (and inversion) steps N.
        t_edit: how many of the first reverse steps are guided (paper: 20 of 60).
        t_start: time the source is inverted to; None means sde.T (the paper inverts to x_T).
        eta: DDIM stochasticity in [0, 1] for every reverse step (paper: 0.8; 0 = deterministic).
        lambda_reg: weight of the L1 regulariser to the stored inversion x0_hat (Eq. 15, paper: 200).
        losses: extra guidance losses, callables x0 -> (B,) (see msdiff.guidance.losses).
        adam_steps: DDS Adam steps per guided step (paper: 1-2 for pixel models; 0 = MCG only).
        lr: Adam learning rate (paper: 0.02).
        code_compat: reproduce the official code, whose returned offset predates the last Adam step.
    """

    def __init__(
        self,
        steps: int = 60,
        t_edit: int = 20,
        t_start: float | None = None,
        eta: float = 0.0,
        lambda_reg: float = 200.0,
        losses: Sequence[Loss] = (),
        adam_steps: int = 1,
        lr: float = 0.02,
        code_compat: bool = False,
    ):
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps={steps}: expected a positive integer")
        if int(t_edit) != t_edit or not 0 <= t_edit <= steps:
            raise ValueError(f"t_edit={t_edit}: expected an integer in [0, steps={steps}]")
        if t_start is not None and not (math.isfinite(t_start) and t_start > 0):
            raise ValueError(f"t_start={t_start}: expected a positive time (or None for sde.T)")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta}: expected a value in [0, 1]")
        if not (math.isfinite(lambda_reg) and lambda_reg >= 0):
            raise ValueError(f"lambda_reg={lambda_reg}: expected a finite value >= 0")
        losses = tuple(losses)
        for i, loss in enumerate(losses):
            if not callable(loss):
                raise ValueError(f"losses[{i}]: expected a callable x0 -> (B,) loss, got {type(loss).__name__}")
        if int(adam_steps) != adam_steps or adam_steps < 0:
            raise ValueError(f"adam_steps={adam_steps}: expected an integer >= 0")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr}: expected a positive learning rate")
        self.steps, self.t_edit, self.t_start, self.eta = int(steps), int(t_edit), t_start, float(eta)
        self.lambda_reg, self.losses = float(lambda_reg), losses
        self.adam_steps, self.lr, self.code_compat = int(adam_steps), float(lr), bool(code_compat)

    def with_losses(self, losses: Sequence[Loss]) -> "AGGSampler":
        """This sampler's options with other guidance losses (e.g. those holding one batch's measurements)."""
        return AGGSampler(self.steps, self.t_edit, self.t_start, self.eta, self.lambda_reg, losses, self.adam_steps,
                          self.lr, self.code_compat)

    def __repr__(self) -> str:
        return (f"AGGSampler(steps={self.steps}, t_edit={self.t_edit}, t_start={self.t_start}, eta={self.eta}, "
                f"lambda_reg={self.lambda_reg}, losses={len(self.losses)}, adam_steps={self.adam_steps}, "
                f"lr={self.lr}, code_compat={self.code_compat})")

    # ---- pieces ------------------------------------------------------------------------------------
    def time_grid(self, sde, device=None, dtype=torch.float32) -> Tensor:
        """steps + 1 increasing times from sde.eps to t_start (the inversion's order)."""
        t_start = sde.T if self.t_start is None else self.t_start
        if not sde.eps < t_start <= sde.T:
            raise ValueError(f"t_start={t_start}: expected a time in (sde.eps={sde.eps}, sde.T={sde.T}]")
        return torch.linspace(sde.eps, t_start, self.steps + 1, device=device, dtype=dtype)

    @property
    def guided_steps(self) -> int:
        """Number of reverse steps that take the MCG gradient (0 when there is nothing to guide by)."""
        return self.t_edit if (self.lambda_reg > 0 or self.losses) else 0

    def loss(self, x0: Tensor, x0_star: Tensor) -> Tensor:
        """Total guidance loss per example (Eq. 15): lambda_reg * L1(x0, x0*) + sum of `losses`, (B,)."""
        total = self.lambda_reg * l1(x0, x0_star)
        for loss in self.losses:
            total = total + loss(x0)
        return total

    @staticmethod
    def _tweedie(sde, score_fn: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a, s = append_dims(sde.mean_coef(t), x.ndim), append_dims(sde.std(t), x.ndim)
        score = score_fn(x, t)
        return (x + s**2 * score) / a, -s * score, a, s

    def dds_offset(self, x0_mcg: Tensor, x0_star: Tensor) -> Tensor:
        """The DDS offset b (Eq. 8): `adam_steps` Adam steps on b, from b = 0, minimising L(x0' + b).

        With code_compat the offset from before the last step is returned (the official code's no-op)."""
        b = torch.zeros_like(x0_mcg)
        m, v = torch.zeros_like(b), torch.zeros_like(b)
        beta1, beta2 = ADAM_BETAS
        for k in range(1, self.adam_steps + 1 - int(self.code_compat)):
            with torch.enable_grad():
                b_var = b.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.loss(x0_mcg + b_var, x0_star).sum(), b_var)
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad**2
            m_hat, v_hat = m / (1 - beta1**k), v / (1 - beta2**k)
            b = (b.detach() - self.lr * m_hat / (v_hat.sqrt() + ADAM_EPS)).detach()
        return b

    def guided_step(self, score_fn: ScoreFn, sde, x: Tensor, t: Tensor, t_next: Tensor,
                    x0_star: Tensor | None = None, generator: Generators = None) -> GuidedStep:
        """One AGG step t -> t' (Eq. 13, hybrid update): MCG through the network, Adam on an offset,
        asymmetric DDIM update. x0_star=None uses the step's own x0_hat as the regulariser's target (the
        first reverse step, whose x_t is the inverted latent itself)."""
        with torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            x0_hat, eps, a, s = self._tweedie(sde, score_fn, x_var, t)
            target = x0_hat.detach() if x0_star is None else x0_star
            (g,) = torch.autograd.grad(self.loss(x0_hat, target).sum(), x_var)
        x0_hat, eps = x0_hat.detach(), eps.detach()
        x0_mcg = x0_hat - (s**2 / a) * g
        x0_final = x0_mcg + self.dds_offset(x0_mcg, target)
        x_next = ddim_step(sde, x0_final, eps, t, t_next, self.eta, generator)
        return GuidedStep(x_next, x0_hat, x0_mcg, x0_final, eps)

    def ddim_step(self, score_fn: ScoreFn, sde, x: Tensor, t: Tensor, t_next: Tensor,
                  generator: Generators = None) -> Tensor:
        """One plain DDIM step t -> t' with this sampler's eta."""
        x0_hat, eps, _, _ = self._tweedie(sde, score_fn, x, t)
        return ddim_step(sde, x0_hat, eps, t, t_next, self.eta, generator)

    @torch.no_grad()
    def invert(self, score_fn: ScoreFn, sde, x_src: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Deterministic DDIM inversion (Eq. 16) from t_0 = sde.eps to t_start. Returns the latent and the
        stored x0_hat* for the guided steps after the first, ordered by increasing t (pop() gives the next
        one the reverse pass needs)."""
        grid = self.time_grid(sde, x_src.device)
        keep_from = self.steps - self.guided_steps + 1
        x, stored, batch = x_src, [], x_src.shape[0]
        for j in range(self.steps):
            t, t_next = grid[j].expand(batch), grid[j + 1].expand(batch)
            x0_hat, eps, _, _ = self._tweedie(sde, score_fn, x, t)
            if j >= keep_from:
                stored.append(x0_hat)
            x = ddim_step(sde, x0_hat, eps, t, t_next, 0.0)
        return x, stored

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde, x_src: Tensor, generator: Generators = None) -> Tensor:
        """Translate x_src (B, ...) in the model's data range: invert, then the guided reverse pass."""
        if not isinstance(x_src, Tensor) or x_src.ndim < 2 or not x_src.is_floating_point():
            raise ValueError("x_src: expected a floating-point tensor of shape (B, ...)")
        x, stored = self.invert(score_fn, sde, x_src)
        grid = self.time_grid(sde, x_src.device)
        batch, n_guided = x_src.shape[0], self.guided_steps
        for k in range(self.steps):
            i = self.steps - k
            t, t_next = grid[i].expand(batch), grid[i - 1].expand(batch)
            if k < n_guided:
                x0_star = stored.pop() if k > 0 else None
                x = self.guided_step(score_fn, sde, x, t, t_next, x0_star, generator).x_next
            else:
                x = self.ddim_step(score_fn, sde, x, t, t_next, generator)
        return x


# ---- construction from simple options (for sample.py's `--guidance AGG`) ------------------------------
def load_image(path: str | Path, image_size: int | None = None, data_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """An image file as a (1, 3, H, W) float tensor in `data_range`, optionally resized to image_size^2
    (`msdiff.images.read_image` and its antialiased bicubic `resize`)."""
    from msdiff.images import read_image, resize

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"target: no such image file {str(path)!r}")
    x = read_image(path, 3)[None]
    if image_size is not None:
        x = resize(x, int(image_size))
    lo, hi = data_range
    return x * (hi - lo) + lo


def build_agg(*, steps: int = 60, t_edit: int = 20, t_start: float | None = None, eta: float = 0.0,
              lambda_reg: float = 200.0, adam_steps: int = 1, lr: float = 0.02, code_compat: bool = False,
              **loss_options) -> AGGSampler:
    """An AGGSampler with the losses of `agg_losses(**loss_options)` (Python use; the `AGG` guidance
    keeps its AGGSampler and adds each batch's losses with `with_losses`)."""
    return AGGSampler(steps=steps, t_edit=t_edit, t_start=t_start, eta=eta, lambda_reg=lambda_reg,
                      adam_steps=adam_steps, lr=lr, code_compat=code_compat).with_losses(agg_losses(**loss_options))


def agg_losses(*, target: str | Path | Tensor | None = None, target_weight: float = 1.0, dino_weights: str | None = None,
               dino_weight: float = 1.0, style: str | Path | Tensor | None = None, style_weight: float = 1.0,
               gram_weight: float = 0.0, operator: Callable[[Tensor], Tensor] | None = None, y: Tensor | None = None,
               consistency_weight: float = 1.0, range_weight: float = 0.0, image_size: int | None = None,
               data_range: tuple[float, float] = (0.0, 1.0), losses: Sequence[Loss] = ()) -> tuple[Loss, ...]:
    """AGG's guidance losses from simple keyword options:

    - target (image path or tensor): pixel MSE to it (target_weight) and, with dino_weights (a local DINO
      ViT checkpoint), the [CLS] loss of App. B Eq. 23 (dino_weight): image-guided translation.
    - style (image path or tensor): channel statistics (style_weight, gram_weight).
    - operator + y: measurement consistency ||A(x0) - y||^2 (consistency_weight): zero-shot inverse
      problems with any task's forward operator.
    - range_weight > 0: soft penalty outside data_range. `losses`: further callables, appended.
    """
    terms: list[Loss] = []
    if target is not None:
        x_trg = target if isinstance(target, Tensor) else load_image(target, image_size, data_range)
        terms.append(MSELoss(x_trg, target_weight))
        if dino_weights is not None:
            terms.append(DinoClsLoss(dino_weights, x_trg, weight=dino_weight, data_range=data_range))
    elif dino_weights is not None:
        raise ValueError("dino_weights: the DINO [CLS] loss needs a target image (target=...)")
    if style is not None:
        x_sty = style if isinstance(style, Tensor) else load_image(style, image_size, data_range)
        terms.append(StatisticsLoss(x_sty, style_weight, gram_weight))
    if (operator is None) != (y is None):
        raise ValueError("operator, y: the consistency loss needs both the operator A and the measurements y")
    if operator is not None:
        terms.append(ConsistencyLoss(operator, y, consistency_weight))
    if range_weight > 0:
        terms.append(RangeLoss(*data_range, weight=range_weight))
    return (*terms, *losses)
