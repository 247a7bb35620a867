"""`sample.py --guidance AGG`: Asymmetric Gradient Guidance (Kwon & Ye, "Improving Diffusion-based
Image Translation using Asymmetric Gradient Guidance") as a `Guidance` that replaces the prior and
the sampler: it inverts the condition and runs the guided reverse pass of
`msdiff.guidance.agg_sampler.AGGSampler`, built per batch (its losses hold that batch's measurements).

Two uses:

* image-guided translation, `--guidance.target IMAGE` (pixel MSE to the target, optionally the DINO
  [CLS] loss with `--guidance.dino_weights`) or `--guidance.target "a text prompt"` (CLIP directional
  loss; needs the optional open_clip package and `--guidance.clip_weights FILE`);
* zero-shot inverse problems, `--guidance.consistency true`: the measurement-consistency loss
  ||A(x0) - y_meas||^2 with the task's own `forward_operator` (and the batch's real inpainting mask),
  where y_meas is the condition in measurement space (the low-res image for SR: `task.measurement(y)`).

Source image x_src (what AGG inverts): the condition y itself, i.e. the nearest-upsampled low-res image
for SR, the masked image for inpainting, the edge map (1 channel repeated to x's channels) for edges.
Prior (which score AGG follows): `prior="unconditional"` uses the estimator's null-condition score (a
CDE trained with condition dropout, p_uncond > 0): that is the truly zero-shot setting, the network
never sees y; `prior="conditional"` uses the estimator's score given y (AGG then adds guidance to a
model that already knows the task); `prior="auto"` (default) takes the unconditional score when the
checkpoint has one, else the conditional one. The choice made is recorded in `metrics.json`.

VE checkpoints: the MCG step scales the loss gradient by s(t)^2 (up to sigma_max^2), so a strong
consistency loss can diverge from t_start = T; `--guidance.t_start 0.5` (SDEdit-like: invert only part
of the way) was stable in benchmarks/RESULTS.md ("AGG zero-shot vs trained estimators").

Draws: with `eta=0` the inversion and the reverse pass are deterministic, so the K draws of a CDE
checkpoint coincide (diversity 0); diffusive estimators (CMDE, ...) still differ through their y_t
noise. `eta > 0` (the paper uses 0.8) gives distinct draws.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from msdiff.estimators import ConditionalEstimator
from msdiff.images import IMAGE_EXTENSIONS
from msdiff.guidance.agg_sampler import AGGSampler, agg_losses, load_image
from msdiff.guidance.base import Guidance
from msdiff.guidance.losses import ClipDirectionalLoss
from msdiff.samplers import Sampler
from msdiff.tasks import Task
from msdiff.utils import Generators

__all__ = ["AGG"]


class AGG(Guidance):
    """`--guidance AGG`: Asymmetric Gradient Guidance on the checkpoint's score network (module doc
    for x_src, prior, draws); it replaces the sampler (`replaces_sampler`).

    Args:
        steps, t_edit, eta, lambda_reg, adam_steps, lr, code_compat: `AGGSampler`.
        t_start: how far the condition is inverted (AGG's t_start; None = T). Default 0.5: inverting
            a VE model to T makes the MCG step (x s(t)^2, up to sigma_max^2) diverge, while 0.5 was
            stable on the quickstart models (benchmarks/RESULTS.md, "AGG zero-shot").
        target: an image file (pixel MSE, weight target_weight) or, if it names no file and has no image
            extension, a text prompt (CLIP directional loss, weight text_weight).
        source_text: CLIP's description of the source domain (text targets only).
        clip_weights, clip_model: a local open_clip checkpoint and its architecture (text targets).
        dino_weights, dino_weight: a local DINO ViT checkpoint for the [CLS] loss (image targets).
        style, style_weight, gram_weight: colour-statistics loss to a style image.
        consistency, consistency_weight: measurement consistency with the task's operator and y.
        range_weight: soft penalty outside [0, 1].
        prior: "auto", "unconditional" or "conditional" score (module doc).
    """

    replaces_sampler = True

    def __init__(self, steps: int = 60, t_edit: int = 20, t_start: Optional[float] = 0.5, eta: float = 0.0,
                 lambda_reg: float = 200.0, adam_steps: int = 1, lr: float = 0.02, code_compat: bool = False,
                 target: Optional[str] = None, target_weight: float = 1.0, source_text: str = "a photo",
                 text_weight: float = 1.0, clip_weights: Optional[str] = None, clip_model: str = "ViT-B-32",
                 dino_weights: Optional[str] = None, dino_weight: float = 1.0, style: Optional[str] = None,
                 style_weight: float = 1.0, gram_weight: float = 0.0, consistency: bool = False,
                 consistency_weight: float = 1.0, range_weight: float = 0.0,
                 prior: Literal["auto", "unconditional", "conditional"] = "auto") -> None:
        # AGG's sampler options, checked now (not at the first batch); each batch adds its losses (`build`)
        self.sampler = AGGSampler(steps, t_edit, t_start, eta, lambda_reg, (), adam_steps, lr, code_compat)
        if prior not in ("auto", "unconditional", "conditional"):
            raise ValueError(f"--guidance.prior {prior}: expected auto, unconditional or conditional")
        self.target, self.text = self._parse_target(target)
        if self.text is not None:
            self._check_clip(clip_weights)
        if dino_weights is not None and self.target is None:
            raise ValueError("--guidance.dino_weights: the DINO [CLS] loss needs an image --guidance.target")
        for name, path in (("dino_weights", dino_weights), ("style", style)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--guidance.{name} {path}: no such file")
        if self.target is None and self.text is None and style is None and not consistency:
            raise ValueError("--guidance AGG: nothing to guide by; give --guidance.target IMAGE|TEXT, "
                             "--guidance.style IMAGE or --guidance.consistency true")
        self.target_weight, self.source_text, self.text_weight = target_weight, source_text, text_weight
        self.clip_weights, self.clip_model = clip_weights, clip_model
        self.dino_weights, self.dino_weight = dino_weights, dino_weight
        self.style, self.style_weight, self.gram_weight = style, style_weight, gram_weight
        self.consistency, self.consistency_weight, self.range_weight = bool(consistency), consistency_weight, range_weight
        self.prior = prior

    @staticmethod
    def _parse_target(target: Optional[str]) -> tuple[Optional[Path], Optional[str]]:
        if target is None:
            return None, None
        path = Path(target)
        if path.is_file():
            return path, None
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"--guidance.target {target}: no such image file")
        return None, str(target)

    def _check_clip(self, clip_weights: Optional[str]) -> None:
        if importlib.util.find_spec("open_clip") is None:
            raise ValueError(f"--guidance.target {self.text!r}: a text target needs the CLIP extra "
                             "(pip install open_clip_torch) and --guidance.clip_weights FILE")
        if clip_weights is None or not Path(clip_weights).is_file():
            raise ValueError(f"--guidance.clip_weights {clip_weights}: a text target needs a local open_clip "
                             "checkpoint file")

    def record(self, estimator: ConditionalEstimator) -> dict[str, str]:
        """{"agg_prior": the score AGG follows with this estimator} (also when a continued run has
        nothing left to sample: the choice depends on the estimator only)."""
        return {"agg_prior": self._prior(estimator)}

    def nfe(self, sampler: Sampler) -> int:
        """Network evaluations per sample (the sampler is not used): `steps` for the inversion and
        `steps` for the reverse pass (the guided steps also backpropagate through the network once each)."""
        return 2 * self.sampler.steps

    def _prior(self, estimator: ConditionalEstimator) -> str:
        has_uncond = bool(estimator.trained_for_cfg)
        if self.prior == "unconditional" and not has_uncond:
            raise ValueError(f"--guidance.prior unconditional: the checkpoint's {type(estimator).__name__} was not trained "
                             "with condition dropout (p_uncond > 0); use prior conditional")
        return self.prior if self.prior != "auto" else ("unconditional" if has_uncond else "conditional")

    def source(self, y: Tensor, x_channels: int) -> Tensor:
        """x_src: the condition itself, with a 1-channel condition repeated to x's channels."""
        return y.expand(-1, x_channels, -1, -1).contiguous() if y.shape[1] == 1 and x_channels != 1 else y

    def build(self, task: Optional[Task], y: Tensor, x_src: Tensor, mask: Optional[Tensor] = None) -> AGGSampler:
        """The AGG of one batch: its losses hold this batch's target, measurements and source."""
        extra = []
        if self.text is not None:
            extra.append(ClipDirectionalLoss(self.clip_weights, self.text, self.source_text, x_src,
                                             model_name=self.clip_model, weight=self.text_weight).to(x_src.device))
        operator = y_meas = None
        if self.consistency:
            if task is None:
                raise ValueError("--guidance.consistency: the checkpoint names no task (no forward operator)")
            operator = (lambda x: task.forward_operator(x, mask=mask))
            y_meas = task.measurement(y)
        target = None
        if self.target is not None:
            target = load_image(self.target, image_size=x_src.shape[-1]).to(x_src)[:, : x_src.shape[1]]
        return self.sampler.with_losses(agg_losses(
            target=target, target_weight=self.target_weight, dino_weights=self.dino_weights, dino_weight=self.dino_weight,
            style=self.style, style_weight=self.style_weight, gram_weight=self.gram_weight, operator=operator,
            y=y_meas, consistency_weight=self.consistency_weight, range_weight=self.range_weight,
            image_size=x_src.shape[-1], losses=extra))

    def sample(self, estimator: ConditionalEstimator, net: nn.Module, y: Tensor, sampler: Sampler, x_channels: int,
               generator: Generators = None, task: Optional[Task] = None,
               mask: Optional[Tensor] = None) -> Tensor:
        """x for the batch of conditions y: AGG from x_src = y with this batch's losses (the
        sampler is not used: AGG's own DDIM inversion and reverse pass replace it)."""
        prior = self._prior(estimator)
        x_src = self.source(y, x_channels)
        agg = self.build(task, y, x_src, mask)
        if prior == "unconditional":
            score_fn = estimator.unconditional_score_fn(net, y)
        else:
            score_fn = estimator.score_fn(net, y, generator=generator)
        return agg(score_fn, estimator.sampling_sde, x_src, generator=generator)

    def __repr__(self) -> str:
        return (f"AGG({self.sampler!r}, target={self.target}, "
                f"text={self.text!r}, consistency={self.consistency}, prior={self.prior})")
