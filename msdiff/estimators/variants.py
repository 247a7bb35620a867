"""CDE, CDiffE and CMDE (Batzolis et al. 2021, Sec. 3-4): which SDE diffuses x and y, and how the
network is sized; the loss and the score come from `ConditionalEstimator`."""
from __future__ import annotations

from msdiff.estimators.base import ConditionalEstimator
from msdiff.sde import SDE, MultiSpeedSDE


class CDE(ConditionalEstimator):
    """Conditional denoising estimator (Batzolis et al. Sec. 3.1, Eq. 8; SR3-style): only x is
    diffused; the network sees (x_t, y) with the clean y and outputs the x-score. Optional
    condition dropout (`p_uncond`) trains the null-condition score for classifier-free guidance."""

    def __init__(self, sde: SDE, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood", preconditioning: str = "none", sigma_data: float = 0.5,
                 log_sigma_mean: float | None = None, log_sigma_std: float = 1.2):
        super().__init__(p_uncond, t_eps, centered, weighting, preconditioning, sigma_data, log_sigma_mean,
                         log_sigma_std)
        self._set_sde(sde, want_pair=False)

    @property
    def sampling_sde(self) -> SDE:
        return self.sde

    @property
    def y_sde(self) -> None:
        return None


class _DiffusiveEstimator(ConditionalEstimator):
    """Base of the estimators that diffuse y as well and learn the joint score of (x_t, y_t)."""

    def __init__(self, p_uncond: float, t_eps: float, centered: bool, weighting: str, preconditioning: str,
                 sigma_data: float, log_sigma_mean: float | None, log_sigma_std: float):
        if p_uncond != 0.0:
            raise ValueError(f"p_uncond={p_uncond}: condition dropout is supported for CDE only (expected 0)")
        super().__init__(p_uncond, t_eps, centered, weighting, preconditioning, sigma_data, log_sigma_mean, log_sigma_std)


class CDiffE(_DiffusiveEstimator):
    """Conditional diffusive estimator (Batzolis et al. Sec. 3.2, Eq. 9): x and y diffuse with
    independent noise under the SAME SDE; the network learns the joint score of (x_t, y_t) and
    sampling uses its x part with y_t ~ p_t(y_t | y) drawn afresh at every call."""

    def __init__(self, sde: SDE, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood", preconditioning: str = "none", sigma_data: float = 0.5,
                 log_sigma_mean: float | None = None, log_sigma_std: float = 1.2):
        super().__init__(p_uncond, t_eps, centered, weighting, preconditioning, sigma_data, log_sigma_mean,
                         log_sigma_std)
        self._set_sde(sde, want_pair=False)

    @property
    def sampling_sde(self) -> SDE:
        return self.sde

    @property
    def y_sde(self) -> SDE:
        return self.sde


class CMDE(_DiffusiveEstimator):
    """Conditional multi-speed diffusive estimator (Batzolis et al. Sec. 4, Theorem 2): as CDiffE
    but y diffuses with its own, slower SDE (`sde.y`), and the loss weights x components by
    g_x(t)^2 and y components by g_y(t)^2 (the maximum-likelihood weighting matrix). As
    sigma_y -> 0 the x part of the joint score tends to the CDE target (Theorem 3)."""

    def __init__(self, sde: MultiSpeedSDE, p_uncond: float = 0.0, t_eps: float = 1e-5, centered: bool = False,
                 weighting: str = "likelihood", preconditioning: str = "none", sigma_data: float = 0.5,
                 log_sigma_mean: float | None = None, log_sigma_std: float = 1.2):
        super().__init__(p_uncond, t_eps, centered, weighting, preconditioning, sigma_data, log_sigma_mean,
                         log_sigma_std)
        self._set_sde(sde, want_pair=True)

    @property
    def sampling_sde(self) -> SDE:
        return self.sde.x

    @property
    def y_sde(self) -> SDE:
        return self.sde.y
