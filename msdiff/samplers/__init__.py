"""Samplers for linear SDEs x_t = a(t) x_0 + s(t) z, driven by any score_fn(x, t) with t of shape (B,).

    x0 = sampler(score_fn, sde, x_T, generator=None)

Modules: `base` (the `Sampler` and `GridSampler` types, `tweedie`), `grids` (the time grids
every sampler takes as its `grid` argument: UniformTime, KarrasSigma, LogSigma), `reverse_sde`
(EulerMaruyama, PredictorCorrector), `ddim` (`ddim_step`, DDIM), `heun` (Heun, HeunPC), `ode`
(ProbabilityFlowODE, bits_per_dim), `edm` (EDMStochastic, Karras et al. 2022 Alg. 2), `dpm_solver`
(DPMSolverPP: DPM-Solver++(2M) and its SDE variant) and `adaptive_sde` (AdaptiveSDE, the
error-controlled SDE solver of Jolicoeur-Martineau et al. 2021). Every public name is importable from `msdiff.samplers`.

Every sampler reads the SDE only through its schedule methods (reverse_drift, diffusion,
transition, mean_coef, std, sigma, t_of_sigma), gets its times from its grid object, runs under
torch.no_grad() (a guided score_fn may re-enable gradients inside), never mutates x_T, is
deterministic given the generator, keeps no trajectory (memory is independent of the number of
steps) and, apart from the scipy ODE solver and AdaptiveSDE's stopping test (one read every
`check_every` iterations), never synchronises with the host inside its loop.
`nfe` is the number of score evaluations per sample (for ProbabilityFlowODE, the count of its last
run). `adaptive` tells the caller whether the sampler picks its steps by error control
(ProbabilityFlowODE): its score must then be deterministic in (x, t), e.g.
`estimator.score_fn(..., fixed_y_noise=True)` for CDiffE/CMDE.

Final outputs: every sampler here finishes at sigma = 0, so no sample carries the noise of its
last time (std s(eps): sigma_min = 0.005 on the paper's VE SDE, 1.3/255). PredictorCorrector and
the PC part of HeunPC end as the reference (score_sde_pytorch's PC sampler with denoise=True):
their last reverse-diffusion step goes from t = eps (sigma_min for VE) to sigma = 0 and its mean
is returned; on a point-mass target that mean is the point itself up to float rounding.
EulerMaruyama, DDIM, Heun, EDMStochastic, DPMSolverPP, AdaptiveSDE and ProbabilityFlowODE(denoise=True)
end with the Tweedie estimate
x0_hat = (x + s^2 score) / a at their last time (for VE, a = 1, the same formula as the
reference's last PC step). ProbabilityFlowODE(denoise=False) is the one exception.
"""
from msdiff.samplers.adaptive_sde import AdaptiveSDE
from msdiff.samplers.base import GridSampler, Sampler, ScoreFn, tweedie
from msdiff.samplers.ddim import DDIM, ddim_step
from msdiff.samplers.dpm_solver import DPMSolverPC, DPMSolverPP, multistep_coefficients
from msdiff.samplers.edm import EDMStochastic, churn_sigmas
from msdiff.samplers.grids import KarrasSigma, LogSigma, SigmaGrid, TimeGrid, UniformTime
from msdiff.samplers.heun import Heun, HeunPC, heun_integrate
from msdiff.samplers.ode import ProbabilityFlowODE, bits_per_dim
from msdiff.samplers.reverse_sde import REFERENCE_SAMPLER, EulerMaruyama, PredictorCorrector

__all__ = [
    "Sampler", "GridSampler", "ScoreFn", "tweedie",
    "TimeGrid", "SigmaGrid", "UniformTime", "KarrasSigma", "LogSigma",
    "EulerMaruyama", "PredictorCorrector", "REFERENCE_SAMPLER",
    "DDIM", "ddim_step",
    "Heun", "HeunPC", "heun_integrate",
    "ProbabilityFlowODE", "bits_per_dim",
    "EDMStochastic", "churn_sigmas", "DPMSolverPP", "DPMSolverPC", "multistep_coefficients", "AdaptiveSDE",
]
