"""sample.py's sampling loop (layer 3, Lightning): K draws per condition through Lightning's
predict loop, PNGs and grids, the paper's metrics.

* `run_sampling(...)`: one `Trainer.predict` over the conditions. Every draw is
  `guidance.sample(estimator, net, y, sampler, ...)` (`msdiff.guidance.base`: THE prior -> score ->
  sampler composition). Draw k of condition i uses its own noise stream keyed by (seed, i, k)
  (`example_noise`), so samples do not depend on the batch size or the number of devices.
  With D devices, device r samples conditions r, r + D, r + 2D, ... (`RankShard`: no padding, so
  any number of conditions works, and no condition is sampled or counted twice). Samples are
  clamped to [0, 1] and quantised for PNGs and metrics; the exact Gaussian-field evaluation uses the
  raw (unclamped) draws, since the field's values are not confined to [0, 1]. Progress (draw, step,
  ETA) and the planned cost: `msdiff.sampling.progress`.
* `build_metrics`: the paper's metrics with the pretrained LPIPS/Inception nets when found.
* `resolve_device`, `launch_rank`: sample.py's --device auto and the launcher's rank.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from msdiff.gaussian import GaussianInverseProblem
from msdiff.guidance.base import Guidance, Unguided
from msdiff.images import sample_grid, write_png
from msdiff.metrics import ConditionalSampleMetrics
from msdiff.samplers import Sampler as DiffusionSampler
from msdiff.sampling.progress import SamplingProgress
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import Task
from msdiff.utils import example_noise

__all__ = ["build_metrics", "SamplingModule", "run_sampling", "resolve_device", "launch_rank", "RankShard"]


def build_metrics(task: Optional[Task], weights_dir: Optional[str], draws: int = 1,
                  download: bool = False) -> ConditionalSampleMetrics:
    """`ConditionalSampleMetrics` with the pretrained LPIPS/Inception nets when found (else unavailable).
    download=True first fetches missing weight files from their official locations
    (`msdiff.metric_weights`); a failed download leaves the metric unavailable, with the reason."""
    from msdiff.metric_weights import download_weights
    from msdiff.metrics import ALEXNET_FILE, INCEPTION_FILE, WeightsUnavailable, load_inception, load_lpips

    notes, nets = {}, {}
    for name, load, keys, file in (("lpips", load_lpips, ("lpips",), ALEXNET_FILE),
                                   ("features", load_inception, ("ufid", "jfid", "ufid_pooled", "jfid_pooled"),
                                    INCEPTION_FILE)):
        try:
            nets[name] = load(weights_dir)
        except WeightsUnavailable as e:
            nets[name], why = None, str(e)
            if download and file in why:  # (not when a package is missing: downloading cannot help)
                try:
                    download_weights(file, weights_dir)
                    nets[name] = load(weights_dir)
                except WeightsUnavailable as e2:
                    why = str(e2)
            if nets[name] is None:
                notes.update({k: why for k in keys})
    return ConditionalSampleMetrics(task=task, features=nets["features"], lpips=nets["lpips"], unavailable=notes, draws=draws)


# ---- devices -----------------------------------------------------------------------------------------
def resolve_device(device: str, devices: int) -> str:
    """--device auto|cpu|cuda -> the accelerator to use ("auto": CUDA when torch sees a GPU), or
    ValueError naming the flag when CUDA is asked for but absent or too few GPUs are visible."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: expected auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                             "use --device auto or cpu")
        if devices > torch.cuda.device_count():
            raise ValueError(f"--devices {devices}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def launch_rank() -> int:
    """This process's rank as set by a launcher (Lightning's DDP children, torchrun): 0 for the process
    the user started. Only rank 0 checks and prepares the output directory."""
    import os

    return max(int(os.environ.get(k) or 0) for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class RankShard(Sampler):
    """Indices rank, rank + D, rank + 2D, ... of range(n) for this process of D (read from
    torch.distributed when iterated, i.e. after the launcher has started every process). Unlike
    Lightning's DistributedSampler it pads nothing, except that a process left without conditions
    (n < D) gets index 0 once, since Lightning refuses an empty loader: `is_padding` tells the
    predict step to skip it."""

    def __init__(self, n: int) -> None:
        self.n = n

    @staticmethod
    def rank_world() -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _indices(self) -> list[int]:
        rank, world = self.rank_world()
        own = list(range(rank, self.n, world))
        return own if own or self.n == 0 else [0]

    @classmethod
    def is_padding(cls, index: int) -> bool:
        rank, world = cls.rank_world()
        return index % world != rank

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


# ---- the predict loop -------------------------------------------------------------------------------
class SamplingModule(pl.LightningModule):
    """Lightning predict wrapper: K draws per condition (`guidance.sample`, module doc), PNGs, a grid
    and metric updates per batch. `metrics` None skips the evaluation (only `draw` is used)."""

    def __init__(self, system: ScoreSystem, sampler: DiffusionSampler, guidance: Optional[Guidance],
                 metrics: Optional[ConditionalSampleMetrics], task: Optional[Task], out: Path, draws: int, seed: int,
                 use_ema: bool, total: int, keep_raw: bool) -> None:
        super().__init__()
        self.system, self.metrics, self.task = system, metrics, task
        self.sampler, self.guidance, self.out = sampler, guidance or Unguided(), out
        self.draws, self.seed, self.use_ema, self.total = draws, seed, use_ema, total
        self.raw: Optional[list] = [] if keep_raw else None
        self.nfe = self.guidance.nfe(sampler)
        self.progress: Optional[SamplingProgress] = None
        self.names: dict[int, str] = {}  # condition index -> file stem, for metrics.json
        self.device_name = "cpu"
        self._hook = None

    def draw(self, y: torch.Tensor, mask: Optional[torch.Tensor], indices: list[int], k: int) -> torch.Tensor:
        """Draw k for the conditions y of the given dataset indices (raw, not clamped)."""
        net = self.system.ema.net if self.use_ema else self.system.net
        g = example_noise(self.seed, indices, k, y.device)   # one noise stream per condition
        return self.guidance.sample(self.system.estimator, net, y, self.sampler, self.system.x_channels,
                                    generator=g, task=self.task, mask=mask)

    def on_predict_start(self) -> None:
        if self.global_rank != 0:
            return
        batches = int(self.trainer.num_predict_batches[0]) if self.trainer.num_predict_batches else 0
        self.progress = SamplingProgress(self.total, self.draws, self.nfe, batches, self.trainer.world_size,
                                         self.device_name, file=sys.stderr)
        print(self.progress.plan_line(), file=sys.stderr, flush=True)
        net = self.system.ema.net if self.use_ema else self.system.net
        # every forward pass of the network is one step of the bar (any sampler, any guidance)
        self._hook = net.register_forward_pre_hook(
            lambda module, args: self.progress.step(args[0].shape[0] if args and torch.is_tensor(args[0]) else None))

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> None:
        y, x, mask = batch["y"].float(), batch.get("x"), batch.get("mask")
        indices = [int(i) for i in batch["index"]]
        if all(RankShard.is_padding(i) for i in indices):  # a process without conditions of its own
            return
        names = batch.get("name") or [f"{i:05d}" for i in indices]
        self.names.update(zip(indices, names))
        draws = []
        for k in range(self.draws):
            if self.progress is not None:
                self.progress.start_draw(k, y.shape[0])
            draws.append(self.draw(y, mask, indices, k))
        raw = torch.stack(draws)  # (K, B, C, H, W)
        samples = raw.clamp(0, 1)
        self.metrics.update(samples, y, None if x is None else x.float(), index=torch.tensor(indices), mask=mask)
        for k in range(self.draws):
            for b, name in enumerate(names):
                write_png(samples[k, b], self.out / "samples" / f"{name}_draw{k}.png")
        write_png(sample_grid(y, samples, x), self.out / "grids" / f"batch{indices[0]:05d}.png")
        if self.raw is not None:
            self.raw.append((raw.cpu(), y.cpu()))
        if self.progress is not None:
            line = self.progress.end_batch()
            if line:
                print(line, file=sys.stderr, flush=True)

    def on_predict_end(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.progress is not None:
            self.progress.close()

    def gathered_per_image(self) -> list[dict]:
        """All ranks' per-condition metric values (with the condition's file stem), by index."""
        from msdiff.metrics import merge_per_image

        parts = [[{**e, "name": self.names.get(int(e["index"]))} for e in self.metrics.per_image()]]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, parts[0])
            parts = gathered
        return merge_per_image(parts)

    def gathered_raw(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """All ranks' raw draws (K, N, ...) and conditions (N, ...) kept for the Gaussian evaluation."""
        if self.raw is None:
            return None
        parts = list(self.raw)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, parts)
            parts = [p for rank in gathered for p in rank]
        if not parts:
            return None
        return torch.cat([s for s, _ in parts], dim=1), torch.cat([y for _, y in parts])


def run_sampling(system: ScoreSystem, dataset: Dataset, n: int, sampler: DiffusionSampler, guidance: Optional[Guidance],
                 metrics: ConditionalSampleMetrics, task: Optional[Task], out: Path, draws: int, batch_size: int,
                 seed: int, use_ema: bool, device: str, devices: int, problem: Optional[GaussianInverseProblem] = None,
                 joint: bool = True) -> Optional[dict]:
    """Sample `draws` per condition for the first n items of `dataset`; rank 0 returns
    {"metrics", "notes", "nfe"[, "gaussian"]}, other ranks None. With a Gaussian `problem`, "gaussian"
    holds the exact posterior error of the draws and (joint=True, conditions from the data's own
    distribution) the exact joint Frechet distance."""
    device = resolve_device(device, devices)
    module = SamplingModule(system, sampler, guidance, metrics, task, out, draws, seed, use_ema, n,
                            keep_raw=problem is not None)
    module.device_name = device
    subset = Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, sampler=RankShard(n))
    trainer = pl.Trainer(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, inference_mode=False, use_distributed_sampler=False)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    values = metrics.compute()  # syncs across ranks
    raw = module.gathered_raw()
    per_image = module.gathered_per_image()
    if trainer.global_rank != 0:
        return None
    result = {"metrics": values, "notes": dict(metrics.notes), "nfe": module.nfe, "per_image": per_image}
    if raw is not None:
        from msdiff.gaussian import joint_frechet_distance, posterior_error

        s, y = raw
        k = s.shape[0]
        exact: dict[str, Any] = {"draws": int(s.shape[0] * s.shape[1]), **posterior_error(s, y, problem)}
        if joint:
            exact["joint_frechet"] = joint_frechet_distance(s.reshape(-1, *s.shape[2:]), y.repeat(k, 1, 1, 1), problem)
        result["gaussian"] = exact
    return result
