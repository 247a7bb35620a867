"""A Gaussian field on an image grid with a linear inverse problem: exact posteriors and exact scores.

Ground truth for every sampler and estimator (layer 1: imports only `msdiff.utils` and `msdiff.sde`).

    x ~ N(mu, Sigma) on a (C, H, W) grid,   Sigma = std^2 (R kron K) + jitter I,
    K_ij = exp(-|p_i - p_j|^2 / (2 l^2))   (squared-exponential kernel over pixel positions p),
    R = (1 - rho) I + rho 1 1^T            (channel correlation rho),
    y = A x + noise_std n,  n ~ N(0, I),    A a (D, D) matrix, so y has x's (C, H, W) shape.

Everything is Gaussian, so (Bishop, PRML Eqs. 2.113-2.117 / 9.3 of Rasmussen & Williams):

    p(x | y)   = N(mu + Sigma A^T S^{-1} (y - A mu),  Sigma - Sigma A^T S^{-1} A Sigma),
    S          = A Sigma A^T + noise_std^2 I,

and a linear SDE x_t = a(t) x_0 + s(t) z (Song et al. 2021, Eq. 29) keeps it Gaussian:

    p_t(x_t | y) = N(a m_post(y), a^2 Sigma_post + s^2 I),
    grad log N(x; m, P) = -P^{-1} (x - m).

The perturbed densities hold for every sigma = s/a >= 0, so a solver that integrates down to
sigma = 0 targets the clean posterior. All moments are float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msdiff.sde import SDE, MultiSpeedSDE


def _sym_eig(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
    return lam.clamp_min(0.0), U


def _psd_sqrt(cov: Tensor) -> Tensor:
    lam, U = _sym_eig(cov)
    return (U * lam.sqrt()) @ U.T


def _flat(x: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    """(B, C, H, W) -> (B, D) float64, checking the trailing shape."""
    if not isinstance(x, Tensor) or x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor of shape (B, {', '.join(map(str, shape))}), got {got}")
    return x.reshape(x.shape[0], -1).double()


def _eig_score(r: Tensor, lam: Tensor, U: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """-(a^2 C + s^2 I)^{-1} r for C = U diag(lam) U^T and per-example a, s of shape (B,); r (B, D)."""
    var = a[:, None] ** 2 * lam + s[:, None] ** 2  # (B, D) eigenvalues of the perturbed covariance
    return -((r @ U) / var) @ U.T


def _grouped_score(r: Tensor, t: Tensor, cov_of_t) -> Tensor:
    """-P(t)^{-1} r with one covariance per distinct t (a Cholesky factor per group, not per example)."""
    out = torch.empty_like(r)
    t_unique, inverse = torch.unique(t, return_inverse=True)
    for k in range(t_unique.numel()):
        idx = (inverse == k).nonzero(as_tuple=True)[0]
        L = torch.linalg.cholesky(cov_of_t(t_unique[k : k + 1]))
        out[idx] = -torch.cholesky_solve(r[idx].T, L).T
    return out


class GaussianField:
    """x ~ N(mu, Sigma) on a (C, H, W) grid with a squared-exponential spatial kernel (module doc)."""

    def __init__(
        self,
        channels: int = 1,
        size: int = 8,
        length_scale: float = 2.0,
        mean: float = 0.5,
        std: float = 0.2,
        jitter: float = 1e-4,
        channel_corr: float = 0.5,
    ):
        if channels < 1:
            raise ValueError(f"channels={channels}: expected a positive integer")
        if size < 1:
            raise ValueError(f"size={size}: expected a positive integer")
        if not length_scale > 0:
            raise ValueError(f"length_scale={length_scale}: expected > 0")
        if not std > 0:
            raise ValueError(f"std={std}: expected > 0")
        if not jitter >= 0:
            raise ValueError(f"jitter={jitter}: expected >= 0")
        if not 0 <= channel_corr < 1:
            raise ValueError(f"channel_corr={channel_corr}: expected 0 <= channel_corr < 1")
        self.channels, self.size = int(channels), int(size)
        ij = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
        p = ij.reshape(-1, 2).double()
        K = torch.exp(-torch.cdist(p, p) ** 2 / (2 * length_scale**2))
        R = (1 - channel_corr) * torch.eye(channels, dtype=torch.float64) + channel_corr
        self._mean = torch.full((self.dim,), float(mean), dtype=torch.float64)
        self._cov = std**2 * torch.kron(R, K) + jitter * torch.eye(self.dim, dtype=torch.float64)
        self._eig = _sym_eig(self._cov)
        self._chol = torch.linalg.cholesky(self._cov)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def dim(self) -> int:
        return self.channels * self.size * self.size

    @property
    def mean(self) -> Tensor:
        return self._mean

    @property
    def cov(self) -> Tensor:
        return self._cov

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws (n, C, H, W) float32."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self._mean + z @ self._chol.T).float().reshape(n, *self.shape)

    def log_prob(self, x: Tensor, t: Tensor | None = None, sde: SDE | None = None) -> Tensor:
        """log N(x; mu, Sigma) per example (B,) float64, or of the perturbed p_t if t and sde are given."""
        x = _flat(x, self.shape, "x")
        a, s = _coefs(sde, x, t)
        lam, U = (v.to(x.device) for v in self._eig)
        var = a[:, None] ** 2 * lam + s[:, None] ** 2
        r = (x - a[:, None] * self._mean.to(x.device)) @ U
        return -0.5 * ((r**2 / var).sum(1) + var.log().sum(1) + self.dim * math.log(2 * math.pi))

    def score(self, x_t: Tensor, t: Tensor, sde: SDE) -> Tensor:
        """Exact grad log p_t(x_t) of the perturbed prior N(a mu, a^2 Sigma + s^2 I), per-example t."""
        x = _flat(x_t, self.shape, "x_t")
        a, s = _coefs(sde, x, t)
        lam, U = (v.to(x.device) for v in self._eig)
        return _eig_score(x - a[:, None] * self._mean.to(x.device), lam, U, a, s).to(x_t.dtype).reshape(x_t.shape)


def _coefs(sde: SDE | None, x: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-example a(t), s(t) in float64 (a = 1, s = 0 when no SDE is given)."""
    if sde is None or t is None:
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return ones, torch.zeros_like(ones)
    sde.check_t(x, t)
    t = t.detach().to(device=x.device, dtype=torch.float64)
    return sde.mean_coef(t), sde.std(t)


class GaussianInverseProblem:
    """y = A x + noise_std n for a GaussianField x; exact posterior, joint and perturbed scores."""

    def __init__(self, field: GaussianField, operator: Tensor, noise_std: float = 0.05):
        D = field.dim
        if not isinstance(operator, Tensor) or tuple(operator.shape) != (D, D):
            got = tuple(operator.shape) if isinstance(operator, Tensor) else type(operator).__name__
            raise ValueError(f"operator: expected a ({D}, {D}) matrix acting on flattened x, got {got}")
        if not noise_std > 0:
            raise ValueError(f"noise_std={noise_std}: expected > 0 (the posterior needs observation noise)")
        self.field, self.noise_std = field, float(noise_std)
        self.A = operator.double()
        Sig, A = field.cov, self.A
        S = A @ Sig @ A.T + self.noise_std**2 * torch.eye(D, dtype=torch.float64)
        self._gain = torch.linalg.solve(S, A @ Sig).T  # Sigma A^T S^{-1}, (D, D)
        self._post_cov = Sig - self._gain @ A @ Sig
        self._post_cov = 0.5 * (self._post_cov + self._post_cov.T)
        self._post_eig = _sym_eig(self._post_cov)
        self._joint_mean = torch.cat([field.mean, A @ field.mean])
        self._joint_cov = torch.cat([torch.cat([Sig, Sig @ A.T], 1), torch.cat([A @ Sig, S], 1)], 0)

    @classmethod
    def super_resolution(cls, field: GaussianField, factor: int = 2, noise_std: float = 0.05) -> "GaussianInverseProblem":
        """A = nearest-neighbour upsampling after factor x factor average pooling (per channel)."""
        if factor < 1 or field.size % factor:
            raise ValueError(f"factor={factor}: expected a positive divisor of size={field.size}")
        n = field.size
        block = torch.arange(n) // factor
        same = (block[:, None] == block[None, :]).double()  # (n, n): same pooling block along one axis
        P = torch.kron(same, same) / factor**2
        return cls(field, torch.kron(torch.eye(field.channels, dtype=torch.float64), P), noise_std)

    @classmethod
    def inpainting(cls, field: GaussianField, hole: int | None = None, noise_std: float = 0.05) -> "GaussianInverseProblem":
        """A = diagonal mask that zeroes a centred hole x hole square (default size // 2) in every channel."""
        n = field.size
        hole = n // 2 if hole is None else hole
        if not 0 <= hole <= n:
            raise ValueError(f"hole={hole}: expected 0 <= hole <= size={n}")
        mask = torch.ones(n, n, dtype=torch.float64)
        lo = (n - hole) // 2
        mask[lo : lo + hole, lo : lo + hole] = 0.0
        return cls(field, torch.diag(mask.flatten().repeat(field.channels)), noise_std)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.field.shape

    @property
    def dim(self) -> int:
        return self.field.dim

    def apply(self, x: Tensor) -> Tensor:
        """A x for x of shape (B, C, H, W) (no noise), in x's dtype."""
        return (_flat(x, self.shape, "x") @ self.A.T).to(x.dtype).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n pairs (x, y), each (n, C, H, W) float32."""
        x = self.field.sample(n, generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        y = _flat(x, self.shape, "x") @ self.A.T + self.noise_std * noise
        return x, y.float().reshape(x.shape)

    def posterior_mean_flat(self, y: Tensor) -> Tensor:
        """E[x | y] as (B, D) float64."""
        y = _flat(y, self.shape, "y")
        mu, A, gain = (v.to(y.device) for v in (self.field.mean, self.A, self._gain))
        return mu + (y - mu @ A.T) @ gain.T

    def posterior(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Exact p(x | y): mean (B, C, H, W) float64 and covariance (D, D) float64 (the same for all y)."""
        return self.posterior_mean_flat(y).reshape(y.shape), self._post_cov

    def joint_moments(self) -> tuple[Tensor, Tensor]:
        """Mean (2D,) and covariance (2D, 2D) of z = (x, y), flattened x first."""
        return self._joint_mean, self._joint_cov

    def posterior_log_prob(self, x: Tensor, y: Tensor, t: Tensor | None = None, sde: SDE | None = None) -> Tensor:
        """log p(x | y) per example (B,) float64, or log p_t(x_t | y) if t and sde are given."""
        x, m = _flat(x, self.shape, "x"), self.posterior_mean_flat(y)
        a, s = _coefs(sde, x, t)
        lam, U = (v.to(x.device) for v in self._post_eig)
        var = a[:, None] ** 2 * lam + s[:, None] ** 2
        r = (x - a[:, None] * m) @ U
        return -0.5 * ((r**2 / var).sum(1) + var.log().sum(1) + self.dim * math.log(2 * math.pi))

    def conditional_score(self, x_t: Tensor, y: Tensor, t: Tensor, sde: SDE) -> Tensor:
        """Exact grad_{x_t} log p_t(x_t | y) with clean y (what CDE learns), in x_t's dtype."""
        x = _flat(x_t, self.shape, "x_t")
        if y.shape != x_t.shape:
            raise ValueError(f"y: expected shape {tuple(x_t.shape)} like x_t, got {tuple(y.shape)}")
        a, s = _coefs(sde, x, t)
        lam, U = (v.to(x.device) for v in self._post_eig)
        r = x - a[:, None] * self.posterior_mean_flat(y)
        return _eig_score(r, lam, U, a, s).to(x_t.dtype).reshape(x_t.shape)

    def joint_cov_t(self, t: Tensor, sde: MultiSpeedSDE) -> Tensor:
        """Covariance (2D, 2D) of (x_t, y_t) for a single time t of shape (1,), float64."""
        D, dev = self.dim, t.device
        t = t.double()
        a = torch.cat([sde.x.mean_coef(t).expand(D), sde.y.mean_coef(t).expand(D)])
        s = torch.cat([sde.x.std(t).expand(D), sde.y.std(t).expand(D)])
        return a[:, None] * self._joint_cov.to(dev) * a[None, :] + torch.diag(s**2)

    def joint_score(self, x_t: Tensor, y_t: Tensor, t: Tensor, sde: MultiSpeedSDE) -> tuple[Tensor, Tensor]:
        """Exact (grad_{x_t}, grad_{y_t}) log p_t(x_t, y_t), x diffused by sde.x and y by sde.y at a
        shared t (what CDiffE / CMDE learn). Per-example t; one Cholesky factor per distinct t."""
        x, yv = _flat(x_t, self.shape, "x_t"), _flat(y_t, self.shape, "y_t")
        if yv.shape[0] != x.shape[0]:
            raise ValueError(f"y_t: expected batch {x.shape[0]} like x_t, got {yv.shape[0]}")
        sde.x.check_t(x, t)
        sde.y.check_t(x, t)
        t = t.detach().to(device=x.device, dtype=torch.float64)
        D, mean = self.dim, self._joint_mean.to(x.device)
        ax, ay = sde.x.mean_coef(t)[:, None], sde.y.mean_coef(t)[:, None]
        r = torch.cat([x - ax * mean[:D], yv - ay * mean[D:]], 1)
        g = _grouped_score(r, t, lambda tk: self.joint_cov_t(tk, sde))
        return g[:, :D].to(x_t.dtype).reshape(x_t.shape), g[:, D:].to(y_t.dtype).reshape(y_t.shape)

    def joint_log_prob(self, x_t: Tensor, y_t: Tensor, t: Tensor, sde: MultiSpeedSDE) -> Tensor:
        """log p_t(x_t, y_t) per example (B,) float64 (for autograd checks of joint_score)."""
        x, yv = _flat(x_t, self.shape, "x_t"), _flat(y_t, self.shape, "y_t")
        D = self.dim
        out = []
        for i in range(x.shape[0]):
            P = self.joint_cov_t(t[i : i + 1].detach(), sde)
            ax, ay = sde.x.mean_coef(t[i : i + 1].double()), sde.y.mean_coef(t[i : i + 1].double())
            m = torch.cat([ax * self._joint_mean[:D], ay * self._joint_mean[D:]])
            z = torch.cat([x[i], yv[i]])
            out.append(torch.distributions.MultivariateNormal(m, P).log_prob(z))
        return torch.stack(out)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) in the FID convention (Dowson & Landau
    1982; Heusel et al. 2017, the squared 2-Wasserstein distance):

        d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^1/2 cov2 cov1^1/2)^1/2)

    in float64, with the matrix square roots from symmetric eigendecompositions (negative round-off
    eigenvalues clipped to 0). Means (D,) (or any shape of D elements), covariances (D, D)."""
    m1, m2 = mu1.double().flatten(), mu2.double().flatten()
    c1, c2 = cov1.double(), cov2.double()
    if m1.shape != m2.shape or c1.shape != (m1.numel(), m1.numel()) or c2.shape != c1.shape:
        raise ValueError(f"frechet_distance: expected means (D,) and covariances (D, D), got {tuple(m1.shape)}, "
                         f"{tuple(m2.shape)}, {tuple(c1.shape)}, {tuple(c2.shape)}")
    r1 = _psd_sqrt(c1)
    cross = torch.linalg.eigvalsh(r1 @ c2 @ r1).clamp_min(0.0).sqrt().sum()  # symmetric up to round-off
    return float((m1 - m2).square().sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross)


def gaussian_w2(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """2-Wasserstein distance between N(mean1, cov1) and N(mean2, cov2): the square root of
    `frechet_distance` (round-off below 0 clipped). Not squared."""
    return math.sqrt(max(frechet_distance(mean1, cov1, mean2, cov2), 0.0))


def _moments(v: Tensor) -> tuple[Tensor, Tensor]:
    m = v.mean(0)
    c = v - m
    return m, c.T @ c / max(v.shape[0] - 1, 1)


def posterior_error(samples: Tensor, y: Tensor, problem: GaussianInverseProblem) -> dict[str, float]:
    """Distance between K draws per condition and the exact posterior.

    samples (K, B, C, H, W) for conditions y (B, C, H, W). The residuals x - E[x | y] of all K*B
    draws are exactly N(0, Sigma_post) for a perfect sampler; their empirical Gaussian N(m, P) gives
      mean_error = |m| / sqrt(tr Sigma_post)          (relative mean error),
      cov_error  = |P - Sigma_post|_F / |Sigma_post|_F (relative covariance error),
      w2         = W2(N(m, P), N(0, Sigma_post)).
    Monte-Carlo noise alone gives mean_error ~ 1/sqrt(K B) and cov_error ~ sqrt(2 / (K B)) or so.
    """
    if samples.ndim != 5 or tuple(samples.shape[1:]) != tuple(y.shape) or tuple(y.shape[1:]) != problem.shape:
        raise ValueError(f"samples: expected (K, B, {', '.join(map(str, problem.shape))}) matching y "
                         f"{tuple(y.shape)}, got {tuple(samples.shape)}")
    K, B = samples.shape[:2]
    m_post = problem.posterior_mean_flat(y.cpu())
    res = (samples.detach().cpu().double().reshape(K, B, -1) - m_post).reshape(K * B, -1)
    m, P = _moments(res)
    C = problem.posterior(y[:1].cpu())[1]
    return {
        "mean_error": float(m.norm() / torch.trace(C).sqrt()),
        "cov_error": float((P - C).norm() / C.norm()),
        "w2": gaussian_w2(m, P, torch.zeros_like(m), C),
    }


def joint_frechet_distance(x: Tensor, y: Tensor, problem: GaussianInverseProblem) -> float:
    """Frechet distance, in the FID convention (the SQUARED W2), between the empirical Gaussian of
    concatenated (x, y) samples (N, C, H, W) each and the exact joint N of (x, y): an exact JFID."""
    xf, yf = _flat(x.detach().cpu(), problem.shape, "x"), _flat(y.detach().cpu(), problem.shape, "y")
    if xf.shape[0] != yf.shape[0] or xf.shape[0] < 2:
        raise ValueError(f"x, y: expected the same number (>= 2) of samples, got {xf.shape[0]} and {yf.shape[0]}")
    m, P = _moments(torch.cat([xf, yf], 1))
    return frechet_distance(m, P, *problem.joint_moments())
