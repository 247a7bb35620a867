"""sample.py's sampling loop (layer 3): K draws per condition, written unit by unit, continuable.

* `SamplingJob(system, dataset, task, sampler, guidance, settings, out, ...)`: one process's share
  of a run (`msdiff.sampling.plan`: fixed batches, `--shard`, devices). For each of its batches it
  writes the conditions' files once, then every draw not yet on disk: draw k of the batch is
  `guidance.sample(estimator, net, y, sampler, ...)` (`msdiff.guidance.base`: THE prior -> score ->
  sampler composition) with a noise stream per condition keyed by (seed, i, k) (`example_noise`).
  Each finished (batch, draw) is written atomically and recorded in the manifest
  (`msdiff.sampling.manifest`); a rerun with the same settings skips what is recorded and intact.
  `run()` returns the samples drawn by this process.
* Stopping: before every network evaluation (a forward pre-hook) the job reads the preemption flag
  (`msdiff.signals`: SIGUSR1/SIGTERM) and raises `msdiff.callbacks.Preempted`; the draw in flight is
  dropped, every finished unit stays on disk. Ctrl-C raises KeyboardInterrupt the same way.
* `build_metrics`: the paper's metrics with the pretrained LPIPS/Inception nets when found.
* `resolve_device`: sample.py's --device auto.

The metrics are not computed here: `msdiff.sampling.evaluate` computes them from the files.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from msdiff import signals
from msdiff.callbacks import Preempted
from msdiff.guidance.base import Guidance, Unguided
from msdiff.images import read_image, sample_grid
from msdiff.metrics import ConditionalSampleMetrics
from msdiff.samplers import Sampler as DiffusionSampler
from msdiff.sampling.conditions import FolderConditions
from msdiff.sampling.layout import (condition_files, grid_file, png_bytes, raw_file, sample_file, tensor_bytes,
                                    write_files)
from msdiff.sampling.manifest import ManifestLog, finished_units, settings_digest
from msdiff.sampling.plan import SamplingSettings, Shard, fixed_batches, share
from msdiff.sampling.progress import SamplingProgress
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import Task
from msdiff.utils import example_noise

__all__ = ["build_metrics", "SamplingJob", "resolve_device", "condition_names"]


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


def condition_names(dataset: Dataset, n: int) -> list[str]:
    """The file stem of each of the first n conditions (the --input file's stem, else the zero-padded
    index); ValueError naming a stem two conditions share (their files would collide)."""
    if isinstance(dataset, FolderConditions):
        out = [str(dataset.items[i]["name"]) for i in range(n)]
    else:
        out = [f"{i:05d}" for i in range(n)]
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        if name in seen:
            raise ValueError(f"conditions {seen[name]} and {i} are both named {name!r}: their samples would overwrite "
                             "each other; give the --input files distinct names")
        seen[name] = i
    return out


class SamplingJob:
    """One process's share of a run (module doc).

    settings: what defines the samples (their digest marks the manifest records); shard, rank, world:
    which fixed batches this process samples; keep_raw: also write the unclamped draws (Gaussian
    fields); progress: show the plan line and the bar (the first process of a job)."""

    def __init__(self, system: ScoreSystem, dataset: Dataset, task: Optional[Task], sampler: DiffusionSampler,
                 guidance: Optional[Guidance], settings: SamplingSettings, out: Path, shard: Shard = Shard(),
                 rank: int = 0, world: int = 1, device: str = "cpu", keep_raw: bool = False,
                 progress: bool = True) -> None:
        self.system, self.dataset, self.task, self.sampler = system, dataset, task, sampler
        self.guidance = guidance or Unguided()
        self.settings, self.out, self.shard, self.rank, self.world = settings, Path(out), shard, rank, world
        self.device = torch.device(f"cuda:{rank}" if device == "cuda" else device)
        self.keep_raw, self.show_progress = keep_raw, progress
        self.nfe = self.guidance.nfe(sampler)
        self.digest = settings_digest(settings.as_dict())
        self.batches = fixed_batches(settings.conditions, settings.batch_size)
        self.mine = share(len(self.batches), shard, rank, world)
        self.names = condition_names(dataset, settings.conditions)
        self.progress: Optional[SamplingProgress] = None
        self._done: dict = {}

    @property
    def net(self) -> torch.nn.Module:
        return self.system.ema.net if self.settings.ema else self.system.net

    def draw(self, y: torch.Tensor, mask: Optional[torch.Tensor], indices: list[int], k: int) -> torch.Tensor:
        """Draw k for the conditions y of the given dataset indices (raw, not clamped)."""
        g = example_noise(self.settings.seed, indices, k, y.device)   # one noise stream per condition
        return self.guidance.sample(self.system.estimator, self.net, y, self.sampler, self.system.x_channels,
                                    generator=g, task=self.task, mask=mask)

    def _batch(self, b: int) -> dict:
        items = [self.dataset[i] for i in self.batches[b]]
        batch = {"y": torch.stack([it["y"] for it in items]).float()}
        for key in ("x", "mask"):
            if all(it.get(key) is not None for it in items):
                batch[key] = torch.stack([it[key] for it in items]).float()
        return batch

    def _before_evaluation(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook of the network: stop on a preemption signal, else count one evaluation."""
        sig = signals.preemption_signal()
        if sig is not None:
            raise Preempted(f"signal {sig}")
        if self.progress is not None:
            self.progress.step(args[0].shape[0] if args and torch.is_tensor(args[0]) else None)

    @property
    def log_name(self) -> str:
        """This process's manifest log (one writer per share: `ManifestLog` locks it)."""
        return f"shard{self.shard.index}of{self.shard.count}-rank{self.rank}"

    def run(self, log: Optional[ManifestLog] = None) -> int:
        """Sample every unit of this process's share that is not finished on disk; the number of
        samples written. `log`: this process's manifest log if already opened (and locked), else it
        is opened here. A (batch, draw) with any sample missing or damaged is sampled again as a
        whole (the same fixed batch: the same bits); only its missing samples are written. Raises
        Preempted on SIGUSR1/SIGTERM (module doc)."""
        s = self.settings
        mine_idx = {i for b in self.mine for i in self.batches[b]}
        done = finished_units(self.out, self.digest, mine_idx)
        todo = {b: [k for k in range(s.draws) if any((i, k) not in done for i in self.batches[b])] for b in self.mine}
        units = sum(len(v) for v in todo.values())
        self._done = done
        if self.show_progress:
            kept = sum((i, k) in done for i in mine_idx for k in range(s.draws))
            self.progress = SamplingProgress(s.conditions, s.draws, self.nfe, units, self.world, self.device.type,
                                             shard=self.shard, finished=kept, file=sys.stderr)
        self.system.to(self.device).eval()
        hook = self.net.register_forward_pre_hook(self._before_evaluation)
        drawn = 0
        try:
            with log or ManifestLog(self.out, self.log_name) as log, torch.no_grad():
                for b in self.mine:
                    missing = [i for i in self.batches[b] if (i, None) not in done]
                    if not todo[b] and not missing and (self.out / grid_file(b)).is_file():
                        continue
                    drawn += self._sample_batch(b, todo[b], missing, log)
        finally:
            hook.remove()
            if self.progress is not None:
                self.progress.close()
        return drawn

    def _sample_batch(self, b: int, draws: list[int], missing: list[int], log: ManifestLog) -> int:
        s, idx = self.settings, self.batches[b]
        batch = self._batch(b)
        y, x, mask = batch["y"], batch.get("x"), batch.get("mask")
        if missing:
            records = []
            for j, i in enumerate(idx):
                if i in missing:
                    files = condition_files(self.names[i], y[j], None if x is None else x[j],
                                            None if mask is None else mask[j])
                    records.append({"index": i, "draw": None, "name": self.names[i], "settings": self.digest,
                                    "files": write_files(self.out, files)})
            log.append(records)
        yd, md = y.to(self.device), None if mask is None else mask.to(self.device)
        for k in draws:
            sig = signals.preemption_signal()
            if sig is not None:
                raise Preempted(f"signal {sig}")
            if self.progress is not None:
                self.progress.start_draw(b, k, len(idx))
            raw = self.draw(yd, md, idx, k).float().cpu()
            records = []
            for j, i in enumerate(idx):
                if (i, k) in self._done:  # intact on disk (its batch-draw is redone for the others' bits)
                    continue
                files = {sample_file(self.names[i], k): png_bytes(raw[j])}
                if self.keep_raw:
                    files[raw_file(self.names[i], k)] = tensor_bytes(raw[j].clone())
                records.append({"index": i, "draw": k, "name": self.names[i], "noise": [s.seed, i, k],
                                "settings": self.digest, "files": write_files(self.out, files)})
            log.append(records)
            if self.progress is not None:
                line = self.progress.end_unit()
                if line:
                    self.progress.write(line)
        self._write_grid(b, y, x)
        return sum((i, k) not in self._done for i in idx for k in draws)

    def _write_grid(self, b: int, y: torch.Tensor, x: Optional[torch.Tensor]) -> None:
        """[y | draws | x] of batch b, from the sample files on disk (the same pixels as the draws)."""
        idx = self.batches[b]
        draws = torch.stack([torch.stack([read_image(self.out / sample_file(self.names[i], k),
                                                     self.system.x_channels) for i in idx])
                             for k in range(self.settings.draws)])
        write_files(self.out, {grid_file(b): png_bytes(sample_grid(y, draws, x))})
