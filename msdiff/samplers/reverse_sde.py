"""Samplers of the reverse-time SDE (Song et al. 2021): Euler-Maruyama, and the predictor-corrector
sampler with its Langevin corrector."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msdiff.samplers.base import GridSampler, ScoreFn, batch_time, checked_score, positive_int, tweedie
from msdiff.samplers.grids import TimeGrid, UniformTime
from msdiff.sde import SDE
from msdiff.utils import Generators, append_dims, randn_like


class EulerMaruyama(GridSampler):
    """Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw_bar (Song et al. 2021,
    Eq. 6) over the `steps` times of `grid` from T to eps (steps - 1 Euler-Maruyama steps; by default
    uniform in t), then the denoising step to sigma = 0 at eps: the Tweedie estimate
    x0_hat = (x + s^2 score) / a (for VE the reference PC sampler's last step). `steps` evaluations."""

    adaptive = False

    def __init__(self, steps: int = 1000, grid: TimeGrid = UniformTime()):
        super().__init__(steps, grid)

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        ts = self.times(sde, x_T)
        x = x_T
        for i in range(self.steps - 1):
            t = batch_time(ts[i], x)
            h = append_dims(t - ts[i + 1], x.ndim)  # positive step size
            x_mean = x - sde.reverse_drift(x, t, checked_score(score_fn, x, t)) * h
            x = x_mean + append_dims(sde.diffusion(t), x.ndim) * h.sqrt() * randn_like(x, generator)
        t = batch_time(ts[-1], x)
        return tweedie(x, t, checked_score(score_fn, x, t), sde)


class PredictorCorrector(GridSampler):
    """Predictor-corrector sampler (Song et al. 2021, Alg. 2 / Alg. 4 for VE and VP alike).

    `steps` times t_0 = T > ... > t_{N-1} = eps of `grid`, by default uniform in t (the reference's
    grid, linspace(T, eps, N)). At each t_i: `corrector_steps` Langevin steps, then the reverse-diffusion
    predictor (Song Eq. 46) built on the exact forward kernel x_{t_i} = r x_{t_{i+1}} + G z:
    x <- (2 - r) x + G^2 score + G z  (the SMLD update for VE, r = 1, G^2 = sigma_i^2 - sigma_{i+1}^2,
    and the DDPM-like one for VP, r = sqrt(1 - beta_i)). The LAST predictor step goes from
    t_{N-1} = eps to sigma = 0, on the kernel x_eps = a(eps) x_0 + s(eps) z (r = a(eps), G = s(eps)),
    and its mean (2 - a) x + s^2 score is returned without noise: as score_sde's VE predictor, whose
    last step goes from the first discrete level sigma_min to the "adjacent sigma" 0 (for VE this mean
    is x + sigma_min^2 score, Tweedie's x0_hat; msdiff's levels sigma(t_i) equal the reference's
    discrete levels up to a factor (sigma_max/sigma_min)^eps <= 1.0002). The VP analogue is the same
    step to a = 1, s = 0 (the DDPM chain's last step with beta_0). On a point-mass target the
    output is the point up to float rounding, not the point plus noise of std sigma_min. Langevin step size as the
    reference: e = 2 r^2 (snr |z| / |score|)^2, norms averaged over the batch (r^2 = alpha_i of the
    reference, 1 for VE). `corrector`:
      "euler" (the reference): x <- x + e score + sqrt(2 e) z;
      "lm": Leimkuhler-Matthews, x <- x + e score + sqrt(e / 2) (z_prev + z), each z used by two
        consecutive steps (Leimkuhler & Matthews 2013); its stationary law is exact for a Gaussian
        target at any stable step size, where Euler's inflates the variance by 1 / (1 - e / 2 sigma^2).
    `sigma_step`: e = 2 r^2 (snr s(t))^2 instead, the same step where the score has the norm of the
    noise's (|score| = |z| / s for pure noise) but independent of the network's output (a network that
    under-predicts the noise's norm gets a larger norm-based step).
    nfe = steps * (1 + corrector_steps) (the reference: 1000 steps, 2000 evaluations).
    """

    adaptive = False

    def __init__(self, steps: int = 1000, snr: float = 0.16, corrector_steps: int = 1, corrector: str = "euler",
                 grid: TimeGrid = UniformTime(), sigma_step: bool = False):
        super().__init__(steps, grid)
        self.corrector_steps = positive_int("corrector_steps", corrector_steps, minimum=0)
        if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
            raise ValueError(f"snr={snr}: expected a finite number > 0")
        if corrector not in ("euler", "lm"):
            raise ValueError(f"corrector={corrector!r}: expected 'euler' or 'lm'")
        self.snr, self.corrector, self.sigma_step = float(snr), corrector, bool(sigma_step)

    @property
    def nfe(self) -> int:
        return self.steps * (1 + self.corrector_steps)

    def langevin(self, score_fn: ScoreFn, x: Tensor, t: Tensor, alpha: Tensor | float = 1.0,
                 generator: Generators = None, z_prev: Tensor | None = None,
                 std: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One Langevin corrector step at time t (B,) targeting p_t (Song Alg. 4, lines 7-10); with `std`
        (s(t), shaped like x's dims) the step is e = 2 alpha (snr std)^2 (`sigma_step`).
        Returns (x, z): z is the `z_prev` of the next Leimkuhler-Matthews step."""
        score = checked_score(score_fn, x, t)
        z = randn_like(x, generator)
        score_norm = score.reshape(x.shape[0], -1).norm(dim=1).mean()
        z_norm = z.reshape(x.shape[0], -1).norm(dim=1).mean()
        # a zero score (e.g. an untrained network with its zero-initialised head) means no step
        e = torch.where(score_norm > 0, 2 * alpha * (self.snr * z_norm / score_norm) ** 2, 0.0) if std is None \
            else 2 * alpha * (self.snr * std) ** 2
        if self.corrector == "euler":
            return x + e * score + (2 * e).sqrt() * z, z
        z_prev = randn_like(x, generator) if z_prev is None else z_prev
        return x + e * score + (e / 2).sqrt() * (z_prev + z), z

    def run(self, score_fn: ScoreFn, sde: SDE, x: Tensor, ts: Tensor, generator: Generators = None) -> Tensor:
        """The predictor-corrector loop over the decreasing times `ts` (one predictor step per time;
        the last one from ts[-1] to sigma = 0); returns the mean of that last step."""
        z = None
        for i in range(len(ts)):
            t = batch_time(ts[i], x)
            if i + 1 < len(ts):
                r, G = sde.transition(t, batch_time(ts[i + 1], x))  # forward kernel t_{i+1} -> t_i
            else:
                r, G = sde.mean_coef(t), sde.std(t)  # forward kernel 0 -> t: x_t = a x_0 + s z
            alpha = append_dims(r**2, x.ndim)
            std = append_dims(sde.std(t), x.ndim) if self.sigma_step else None
            for _ in range(self.corrector_steps):
                x, z = self.langevin(score_fn, x, t, alpha, generator, z, std)
            r, G = append_dims(r, x.ndim), append_dims(G, x.ndim)
            x_mean = (2 - r) * x + G**2 * checked_score(score_fn, x, t)
            if i + 1 < len(ts):
                x = x_mean + G * randn_like(x, generator)
        return x_mean

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, generator: Generators = None) -> Tensor:
        return self.run(score_fn, sde, x_T, self.times(sde, x_T), generator)


#: the MSDiff reference's sampler as a class_path config: score_sde_pytorch's predictor-corrector (reverse
#: diffusion + Langevin; snr 0.16 there, 0.15 in the MSDiff configs), 1000 steps = 2,000 network evaluations
#: per sample. sample.py's sampler without --sampler, `TrainedRun.sample`'s default, the benchmarks' reference.
REFERENCE_SAMPLER = {"class_path": "msdiff.samplers.PredictorCorrector", "init_args": {"steps": 1000, "snr": 0.15}}
