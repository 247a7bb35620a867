"""Conditional score estimators of Batzolis et al. 2021, "Conditional Image Generation with
Score-Based Diffusion Models" (MSDiff): CDE, CDiffE, CMDE and VS-CMDE.

Each estimator turns a plain network `net(h, noise_label)` into a training loss and, for sampling
from p(x | y), into an x-score `score(x_t, t)` that any sampler in `msdiff.samplers` integrates
with `estimator.sampling_sde`. Conventions (those of the paper's reference code):

* Time: t ~ U(t_eps, T) with t_eps = 1e-5, ONE t per example, shared by x and y
  (`noise_levels=LogNormalSigma()` draws EDM's log-normal noise levels instead:
  `msdiff.estimators.noise_levels`).
* Network input: h = concat(x_t, y) (CDE, clean y) or concat(x_t, y_t) (diffusive estimators)
  along channels, mapped by h -> 2 h - 1 when the data live in [0, 1] (`centered=False`).
* Network output: divided by the marginal std it is the score (x channels by std_x(t), y channels
  by std_y(t)), i.e. the network predicts -z, the negated standard-normal noise.
* Noise label: the network receives `999 * t` (`Preconditioning.c_noise(t)`), as the reference's
  conditional score functions do (`t * (N - 1)` with N = 1000, for VE and multi-speed SDEs alike;
  only its unconditional VE models were fed sigma(t)): the SDE-agnostic time label of DDPM, which
  is also the only label that means the same for x and y when they diffuse at different speeds (CMDE).
* Loss: denoising score matching with the maximum-likelihood weighting of Theorem 2 (Song et al.
  2021b, Eq. 7 with lambda(t) = g(t)^2): weight g_x(t)^2 on the x components and g_y(t)^2 on the
  y components, averaged over ALL x and y elements of an example (the reference's reduce_mean):

      L = mean_i  g_i(t)^2 || out_i / std_i(t) + z_i / std_i(t) ||^2
        = mean_i  (g_i(t) / std_i(t))^2 || out_i + z_i ||^2.

  For VE, (g/std)^2 = 2 ln(sigma_max / sigma_min) is constant: a network that outputs zeros gets
  2 ln(277.128 / 0.005) = 21.85 (CDE, CDiffE at the SR-160 sigmas) and (21.85 + 9.21) / 2 = 15.53
  (CMDE with sigma_max_y = 0.5, x and y of equal size). `weighting=SimpleWeighting()` drops the
  weight (plain eps-MSE, Ho et al. 2020), which is better conditioned for VP near t = 0
  (`msdiff.estimators.weighting`).
* Options shared by every estimator (p_uncond, t_eps, centered, weighting, preconditioning,
  noise_levels) are
  `ConditionalEstimator`'s keyword arguments; CDE, CDiffE, CMDE and VSCMDE take their SDE (and
  VS-CMDE its schedule) and pass the rest on.
* Preconditioning: `ReferencePrecond()` (the above) or `EDMPrecond(sigma_data)` (Karras et al.
  2022, Table 1), objects that name c_skip, c_out, c_in and c_noise
  (`msdiff.estimators.preconditioning`).

Every quantity comes from the SDE's schedules (mean_coef, std, diffusion, with_speed), so VE, VP
and sub-VP SDEs, and any multi-speed pair of them, work alike.
"""
from msdiff.estimators.base import ConditionalEstimator, ScoreFn
from msdiff.estimators.noise_levels import LogNormalSigma, NoiseLevels, UniformTimes
from msdiff.estimators.preconditioning import EDMPrecond, Preconditioning, ReferencePrecond
from msdiff.estimators.variants import CDE, CMDE, CDiffE
from msdiff.estimators.vscmde import VSCMDE
from msdiff.estimators.weighting import LikelihoodWeighting, SimpleWeighting, Weighting

__all__ = ["ConditionalEstimator", "CDE", "CDiffE", "CMDE", "VSCMDE", "ScoreFn", "Preconditioning", "ReferencePrecond",
           "EDMPrecond", "Weighting", "LikelihoodWeighting", "SimpleWeighting", "NoiseLevels", "UniformTimes",
           "LogNormalSigma"]
