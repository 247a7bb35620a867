"""CDE, CDiffE and CMDE (Batzolis et al. 2021, Sec. 3-4): which SDE diffuses x and y, and how the
network is sized; the loss and the score come from `ConditionalEstimator`, which also takes the
options they share (p_uncond, t_eps, centered, weighting, preconditioning) as keyword arguments."""
from __future__ import annotations

from msdiff.estimators.base import ConditionalEstimator
from msdiff.sde import SDE, MultiSpeedSDE


class _OneSDEEstimator(ConditionalEstimator):
    """Base of CDE and CDiffE: x diffuses under `sde`, and y too (under the same SDE) when the
    subclass `diffuses_y`."""

    def __init__(self, sde: SDE, **kwargs):
        super().__init__(**kwargs)
        self._set_sde(sde, want_pair=False)

    @property
    def sampling_sde(self) -> SDE:
        return self.sde

    @property
    def y_sde(self) -> SDE | None:
        return self.sde if self.diffuses_y else None


class CDE(_OneSDEEstimator):
    """Conditional denoising estimator (Batzolis et al. Sec. 3.1, Eq. 8; SR3-style): only x is
    diffused; the network sees (x_t, y) with the clean y and outputs the x-score. Optional
    condition dropout (`p_uncond`) trains the null-condition score for classifier-free guidance.
    Args: `sde` (an SDE such as VESDE) and the options of `ConditionalEstimator`."""


class CDiffE(_OneSDEEstimator):
    """Conditional diffusive estimator (Batzolis et al. Sec. 3.2, Eq. 9): x and y diffuse with
    independent noise under the SAME SDE; the network learns the joint score of (x_t, y_t) and
    sampling uses its x part with y_t ~ p_t(y_t | y) drawn afresh at every call. Args: `sde` and
    the options of `ConditionalEstimator` (p_uncond must stay 0)."""

    diffuses_y = True


class CMDE(ConditionalEstimator):
    """Conditional multi-speed diffusive estimator (Batzolis et al. Sec. 4, Theorem 2): as CDiffE
    but y diffuses with its own, slower SDE (`sde.y`), and the loss weights x components by
    g_x(t)^2 and y components by g_y(t)^2 (the maximum-likelihood weighting matrix). As
    sigma_y -> 0 the x part of the joint score tends to the CDE target (Theorem 3). Other options:
    `ConditionalEstimator` (p_uncond must stay 0)."""

    diffuses_y = True

    def __init__(self, sde: MultiSpeedSDE, **kwargs):
        super().__init__(**kwargs)
        self._set_sde(sde, want_pair=True)

    @property
    def sampling_sde(self) -> SDE:
        return self.sde.x

    @property
    def y_sde(self) -> SDE:
        return self.sde.y
