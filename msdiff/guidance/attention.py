"""Attention-perturbation guidance: ASAG, PAG and SEG on the estimators' x-score.

The network is run twice on the same input, once as trained (score s) and once with the
self-attention of chosen layers replaced by a perturbed map (score s_perturbed), and the sampler
integrates

    s_guided = s + scale (s - s_perturbed)                                   (guidance only)
    s_guided = s_u + w (s_c - s_u) + scale (s_c - s_c_perturbed)             (with CFG, w = cfg_scale)

the second being eps_u + w (eps_c - eps_u) + s (eps_c - eps_c_perturbed) of the papers in score
form (eps = -std * score is linear in the score). Perturbations:

- ASAG, Adversarial Sinkhorn Attention Guidance (Kim 2025, arXiv:2511.07499): the softmax map is
  replaced by the Sinkhorn transport plan of the adversarial kernel exp(-q k^T / sqrt(d)) (mass on
  DISSIMILAR query/key pairs), `msdiff.nn.attention.ASAGProcessor`; default scale 1.5, 2 iterations.
- PAG, Perturbed-Attention Guidance (Ahn et al. 2024, Eq. 9 with the identity map of Sec. 4.2):
  output = v; default scale 3.0.
- SEG, Smoothed Energy Guidance (Hong 2024, Sec. 4): queries blurred by a Gaussian over the token
  grid, sigma = inf (default) replacing each by the mean query; default scale 3.0.

Choices where the papers say nothing about conditional score estimators:
- Both branches see the same x_t, t and the same network condition: for CDiffE / CMDE / VS-CMDE
  ONE y_t is drawn per score call (with the sampler's generator, exactly as the unguided score
  draws it) and shared by every branch, so the difference s - s_perturbed carries no y_t noise.
- `batched=True` (default) evaluates all branches in ONE network call on the batch stacked
  [cond; (uncond;) perturbed]; the chosen layers then run the trained processor on the first rows
  and the perturbed one on the last B rows (`RowSplitProcessor`). `batched=False` runs one call per
  branch (less memory). The trained layers' processors are restored after every call, also when
  the network raises (`msdiff.nn.attention.swap_attention_processors`).
- scale = 0 with cfg_scale = 1 returns the estimator's own score function: bitwise unguided, no
  extra pass, the same random draws.
- `layers` names attention blocks of the U-Net (see `UNet.attention_layers()`); a prefix selects
  every attention layer below it ("mid" -> "mid.attn", "down" -> all of the down path).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from msdiff.estimators import ConditionalEstimator
from msdiff.guidance.base import Guidance, ScoreFn
from msdiff.guidance.cfg import check_scale, fixed_noise, network_condition, require_cfg, x_scores
from msdiff.nn.attention import (ASAGProcessor, AttentionProcessor, PAGProcessor, SEGProcessor,
                                 select_attention_layers, swap_attention_processors)
from msdiff.utils import Generators

__all__ = ["AttentionGuidance", "ASAG", "PAG", "SEG", "RowSplitProcessor", "perturb_rows"]


class RowSplitProcessor:
    """Runs `base` on batch rows [:start] and `perturbed` on rows [start:]: the trained and the
    perturbed attention of guidance in one network call."""

    def __init__(self, base: AttentionProcessor, perturbed: AttentionProcessor, start: int) -> None:
        self.base, self.perturbed, self.start = base, perturbed, int(start)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int]) -> Tensor:
        s = self.start
        return torch.cat([self.base(q[:s], k[:s], v[:s], grid), self.perturbed(q[s:], k[s:], v[s:], grid)])

    def __repr__(self) -> str:
        return f"RowSplitProcessor({self.base!r}, {self.perturbed!r}, start={self.start})"


@contextmanager
def perturb_rows(net: nn.Module, processor: AttentionProcessor, layers: str | Sequence[str],
                 start: int) -> Iterator[None]:
    """Inside the block the chosen layers apply `processor` to batch rows [start:] and keep their
    own processor on the rows before; every layer gets its own processor back on exit."""
    with ExitStack() as stack:
        for name, layer in select_attention_layers(net, layers).items():
            split = RowSplitProcessor(layer.processor, processor, start)
            stack.enter_context(swap_attention_processors(net, split, layers=(name,)))
        yield


def _check_layers(layers: str | Sequence[str]) -> tuple[str, ...]:
    entries = (layers,) if isinstance(layers, str) else tuple(layers)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"layers: expected attention layer names such as ('mid',), got {layers!r}")
    return entries


class AttentionGuidance(Guidance):
    """Guidance by a perturbed self-attention (module doc): s_u + w (s_c - s_u) + scale (s_c - s_p).

    Args:
        processor: the perturbed attention processor installed on `layers` for the perturbed pass.
        scale: attention-guidance scale (>= 0); 0 skips the perturbed pass.
        layers: attention layers to perturb, by name or prefix (default: the middle block).
        cfg_scale: classifier-free guidance weight w (>= 0); 1 (default) is no CFG and skips the
            unconditional pass; any other value needs a CDE trained with p_uncond > 0.
        batched: all branches in one network call (True) or one call per branch (False).
    """

    def __init__(self, processor: AttentionProcessor, scale: float, layers: str | Sequence[str] = ("mid",),
                 cfg_scale: float = 1.0, batched: bool = True) -> None:
        if not callable(processor):
            raise ValueError(f"processor: expected a callable (q, k, v, grid) -> out, got {processor!r}")
        self.processor = processor
        self.scale = check_scale("scale", scale)
        self.layers = _check_layers(layers)
        self.cfg_scale = check_scale("cfg_scale", cfg_scale)
        self.batched = bool(batched)

    @property
    def branches(self) -> tuple[str, ...]:
        """The branches one score call evaluates, in batch order: "cond", then "uncond" when
        cfg_scale != 1, then "perturbed" when scale > 0."""
        return (("cond",) + (("uncond",) if self.cfg_scale != 1.0 else ())
                + (("perturbed",) if self.scale > 0.0 else ()))

    @property
    def evaluations(self) -> int:
        """Network evaluations (in units of the batch) per score call."""
        return len(self.branches)

    def _prepare(self, estimator: ConditionalEstimator, net: nn.Module) -> None:
        select_attention_layers(net, self.layers)  # unknown names: ValueError now, not mid-sampling
        if self.cfg_scale != 1.0:
            require_cfg(estimator)

    def branch_scores(self, estimator: ConditionalEstimator, net: nn.Module, y: Tensor,
                      generator: Generators = None, fixed_y_noise: bool = False):
        """`scores(x_t, t) -> {branch: x-score}` for the branches in `self.branches`, all at the
        same x_t, t and network condition (one y_t draw per call for the diffusive estimators, or
        one draw for all calls with fixed_y_noise)."""
        self._prepare(estimator, net)
        names, processor, layers, batched = self.branches, self.processor, self.layers, self.batched
        z = fixed_noise(estimator, y, generator, fixed_y_noise)

        def scores(x: Tensor, t: Tensor) -> dict[str, Tensor]:
            _, t = estimator.prepare(x, y, t)
            cond = network_condition(estimator, y, x, t, generator, z)
            conds = [estimator.null_condition(cond) if n == "uncond" else cond for n in names]
            if batched:
                if names[-1] == "perturbed":
                    with perturb_rows(net, processor, layers, start=(len(names) - 1) * x.shape[0]):
                        out = x_scores(estimator, net, x, t, conds)
                else:
                    out = x_scores(estimator, net, x, t, conds)
                return dict(zip(names, out))
            result = {}
            for name, c in zip(names, conds):
                if name == "perturbed":
                    with swap_attention_processors(net, processor, layers):
                        result[name] = x_scores(estimator, net, x, t, (c,))[0]
                else:
                    result[name] = x_scores(estimator, net, x, t, (c,))[0]
            return result

        return scores

    def score_fn(self, estimator: ConditionalEstimator, net: nn.Module, y: Tensor,
                 generator: Generators = None, fixed_y_noise: bool = False) -> ScoreFn:
        """The guided x-score `score(x_t, t)` (class doc); scale 0 and cfg_scale 1 give exactly
        `estimator.score_fn(net, y, generator, fixed_y_noise=...)`. fixed_y_noise: one y_t noise
        for every call (adaptive samplers; `msdiff.guidance.base`)."""
        if self.branches == ("cond",):
            self._prepare(estimator, net)
            return estimator.score_fn(net, y, generator, fixed_y_noise=fixed_y_noise)
        scores = self.branch_scores(estimator, net, y, generator, fixed_y_noise)
        scale, w = self.scale, self.cfg_scale

        def score(x: Tensor, t: Tensor) -> Tensor:
            s = scores(x, t)
            s_c = s["cond"]
            guided = s["uncond"] + w * (s_c - s["uncond"]) if "uncond" in s else s_c
            if "perturbed" in s:
                guided = guided + scale * (s_c - s["perturbed"])
            return guided

        return score

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self.scale}, layers={self.layers}, cfg_scale={self.cfg_scale}, "
                f"batched={self.batched}, processor={self.processor!r})")


class ASAG(AttentionGuidance):
    """Adversarial Sinkhorn Attention Guidance (Kim 2025): the perturbed map is the Sinkhorn plan
    of exp(-q k^T / sqrt(d)) after `iters` iterations (module doc; `msdiff.nn.attention.sinkhorn_plan`)."""

    def __init__(self, scale: float = 1.5, iters: int = 2, layers: str | Sequence[str] = ("mid",),
                 cfg_scale: float = 1.0, batched: bool = True) -> None:
        super().__init__(ASAGProcessor(iters), scale, layers, cfg_scale, batched)
        self.iters = int(iters)


class PAG(AttentionGuidance):
    """Perturbed-Attention Guidance (Ahn et al. 2024): the perturbed map is the identity (output = v)."""

    def __init__(self, scale: float = 3.0, layers: str | Sequence[str] = ("mid",),
                 cfg_scale: float = 1.0, batched: bool = True) -> None:
        super().__init__(PAGProcessor(), scale, layers, cfg_scale, batched)


class SEG(AttentionGuidance):
    """Smoothed Energy Guidance (Hong 2024): queries Gaussian-blurred over the token grid with
    `sigma` (inf, the default: every query replaced by the mean query, the limit of infinite blur;
    0: no perturbation). On the command line infinity is YAML's `.inf`: `--guidance.sigma .inf`."""

    def __init__(self, scale: float = 3.0, sigma: float = float("inf"), layers: str | Sequence[str] = ("mid",),
                 cfg_scale: float = 1.0, batched: bool = True) -> None:
        super().__init__(SEGProcessor(sigma), scale, layers, cfg_scale, batched)
        self.sigma = float(sigma)
