"""The Gaussian field of `msdiff.gaussian` as a dataset: pairs (x, y) with an exact posterior.

x ~ N(mu, Sigma) on a small grid and y = A x + noise_std n (super-resolution: block averaging
then nearest upsampling; inpainting: a centred hole), drawn per index from a generator seeded
from (seed, split, index), so every split is fixed and the exact posterior p(x | y) of
`GaussianInverseProblem` is the ground truth for samplers and estimators trained on it. Values
are not clipped to [0, 1] (the default field has mean 0.5 and std 0.2).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from msdiff.datasets.base import ConditionalDataset
from msdiff.gaussian import GaussianField, GaussianInverseProblem
from msdiff.tasks import Task, masked_psnr


class GaussianProblemTask(Task):
    """A `GaussianInverseProblem` seen as a task: A is its linear operator, y = A x + noise."""

    def __init__(self, problem: GaussianInverseProblem) -> None:
        self.problem = problem

    def __repr__(self) -> str:
        return f"GaussianProblemTask(shape={self.problem.shape}, noise_std={self.problem.noise_std})"

    def forward_operator(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """A x (noise-free), shaped like x."""
        return self.problem.apply(x)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return {"y": self.forward_operator(x) + self.problem.noise_std * noise}

    def consistency(self, x_sample: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        """PSNR between A x_sample and y (bounded by the observation noise)."""
        return masked_psnr(self.forward_operator(x_sample), y)

    def gaussian_problem(self) -> GaussianInverseProblem:
        return self.problem


class GaussianFieldDataset(ConditionalDataset):
    """`length` pairs (x, y) of a Gaussian inverse problem (module doc).

    `operator` picks `GaussianInverseProblem.super_resolution(field, factor, noise_std)` or
    `.inpainting(field, hole, noise_std)`; pass `problem` instead to use a ready one (Python
    use). Nothing is read from disk.
    """

    def __init__(self, split: str = "train", task: Task | None = None, channels: int = 1, size: int = 8, length_scale: float = 2.0,
                 operator: Literal["super_resolution", "inpainting"] = "super_resolution",
                 factor: int = 2, hole: int | None = None, noise_std: float = 0.05,
                 length: int | None = None, seed: int = 0,
                 problem: GaussianInverseProblem | None = None) -> None:
        if problem is None:
            field = GaussianField(channels=channels, size=size, length_scale=length_scale)
            if operator == "super_resolution":
                problem = GaussianInverseProblem.super_resolution(field, factor=factor, noise_std=noise_std)
            elif operator == "inpainting":
                problem = GaussianInverseProblem.inpainting(field, hole=hole, noise_std=noise_std)
            else:
                raise ValueError(f"GaussianFieldDataset: operator must be 'super_resolution' or 'inpainting', got {operator!r}")
        self.problem = problem
        super().__init__(split, task if task is not None else GaussianProblemTask(problem), seed, flip=False)
        self.length = {"train": 10_000, "val": 500, "test": 500}[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"GaussianFieldDataset: length must be positive, got {length}")

    def __len__(self) -> int:
        return self.length

    def load(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = self.problem.sample(1, self.generator(index, epoch=0))
        return x[0], y[0]
