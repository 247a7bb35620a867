"""What `sample.py` runs (layer 3, Lightning): rebuild a checkpoint, sample K draws per condition
through Lightning's predict loop, write PNGs and grids, accumulate the paper's metrics.

* `load_system(ckpt_path)`: a train.py checkpoint (`msdiff.systems.score.load_score_system`) or an
  inference file (`msdiff.export`), as a `ScoreSystem` in eval mode plus its stored config.
* `build_data(cfg, split)`: the checkpoint's `ConditionalDataModule`, its split and its task
  (`.split(name)`, `.task`); `gaussian_problem(task)` is the exact problem of a Gaussian-field task.
* `run_sampling(...)`: one `Trainer.predict` over the conditions. Draw k of condition i uses one
  generator per row seeded by (seed, i, k) (`msdiff.export.example_generators`), so samples do not
  depend on the batch size or the number of devices. With D devices, device r samples conditions
  r, r + D, r + 2D, ... (`RankShard`: no padding, so any number of conditions works, and no condition
  is sampled or counted twice). Samples are clamped to [0, 1] and quantised for PNGs and metrics;
  the exact Gaussian-field evaluation uses the raw (unclamped) draws, since the field's values are
  not confined to [0, 1]. Progress (draw, step, ETA) and the planned cost: `msdiff.sampling_progress`.
* `resolve_device`, `prepare_output_dir`, `checkpoint_step`: sample.py's --device auto, its
  output-directory rule and the checkpoint's global step for metrics.json.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from msdiff.checkpoint_file import verify_checkpoint
from msdiff.export import example_generators, is_inference_file, make_grid, save_png
from msdiff.sampling_guidance import network_evaluations
from msdiff.sampling_inputs import MaskedConsistency
from msdiff.sampling_progress import SamplingProgress
from msdiff.systems.score import ScoreSystem, instantiate_config, load_score_system

__all__ = ["load_system", "build_data", "gaussian_problem", "check_writable", "build_metrics", "SamplingModule",
           "run_sampling", "resolve_device", "prepare_output_dir", "checkpoint_step", "launch_rank", "RankShard"]


# ---- loading --------------------------------------------------------------------------------------
def load_system(ckpt_path: str) -> tuple[ScoreSystem, dict]:
    """(ScoreSystem in eval mode, its {"model", "data"} config) from a train.py checkpoint or an
    inference file; ValueError naming the file when it is neither."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"--ckpt_path {path}: no such file")
    verify_checkpoint(path)  # CRC-32 of every member (torch.load does not check them)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"--ckpt_path {path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if is_inference_file(obj):
        cfg = {k: v for k, v in obj["msdiff"].items() if k not in ("format", "version")}
        system = instantiate_config(cfg["model"], ScoreSystem)
        try:
            system.ema.net.load_state_dict(obj["net"])
            system.net.load_state_dict(obj["net"])  # the file holds the EMA weights only
            system.estimator.load_state_dict(obj["estimator"])
        except RuntimeError as e:
            raise ValueError(f"--ckpt_path {path}: weights do not match the stored config ({str(e).splitlines()[0]})") from None
        system.msdiff_config = cfg
        return system.eval(), cfg
    if not (isinstance(obj, dict) and isinstance(obj.get("msdiff"), dict) and "state_dict" in obj):
        raise ValueError(f"--ckpt_path {path}: not an msdiff checkpoint (no 'msdiff' config entry); "
                         "expected a train.py checkpoint or a sample.py --export file")
    del obj
    system = load_score_system(path, map_location="cpu")
    return system.eval(), system.msdiff_config


def build_data(cfg: dict, split: Optional[str], task: Optional[str] = None) -> tuple[Optional[Dataset], Any]:
    """(the `split` dataset or None, the task) of the checkpoint's data module (`ConditionalDataModule`).

    `task` replaces the dataset's task: a class path (`msdiff.tasks.Inpainting`) or a JSON
    {"class_path", "init_args"} dict, e.g. for AGG solving another inverse problem zero-shot."""
    data_cfg = cfg.get("data")
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        raise ValueError("--ckpt_path: the checkpoint stores no data config (expected train.py's 'data' entry)")
    if task is not None:
        data_cfg = copy.deepcopy(data_cfg)
        try:
            task_cfg = json.loads(task) if task.lstrip().startswith("{") else {"class_path": task}
        except json.JSONDecodeError as e:
            raise ValueError(f"--task {task}: not valid JSON ({e.msg})") from None
        dataset_cfg = data_cfg.get("init_args", {}).get("dataset")
        if not isinstance(dataset_cfg, dict):
            raise ValueError("--task: the checkpoint's data config has no dataset to give a task to")
        dataset_cfg.setdefault("init_args", {})["task"] = task_cfg
        _check_task(task, task_cfg)
    dm = instantiate_config(data_cfg, pl.LightningDataModule)
    if not callable(getattr(dm, "split", None)):
        raise ValueError(f"--ckpt_path: data module {data_cfg['class_path']} has no split(name); expected "
                         "msdiff.data.ConditionalDataModule")
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"--split {split}: expected train, val or test")
    if split is not None:
        return dm.split(split), dm.task
    try:  # --input: only the task is needed; datasets of files build it without their files if they can
        return None, dm.task
    except (OSError, ValueError) as e:
        task_cfg = data_cfg.get("init_args", {}).get("dataset", {}).get("init_args", {}).get("task")
        if isinstance(task_cfg, dict):
            from msdiff.tasks import Task

            return None, instantiate_config(task_cfg, Task)
        raise ValueError(f"--input: the task comes from the checkpoint's data set, which cannot be built here "
                         f"({str(e).splitlines()[0]}); pass --task CLASS") from None


def _check_task(option: str, task_cfg: dict) -> None:
    """ValueError naming --task with jsonargparse's real cause (e.g. a misspelled class, with a
    "did you mean") instead of the data module's nested report."""
    from msdiff.cli import jsonargparse_cause
    from msdiff.tasks import Task

    try:
        instantiate_config(task_cfg, Task)
    except Exception as e:
        text = str(e).strip()
        cause = jsonargparse_cause(text) or (text.splitlines() or [type(e).__name__])[0]
        cause = cause[len("obj"):].lstrip(".:").lstrip() if cause.startswith("obj") else cause  # instantiate_config's key
        raise ValueError(f"--task {option}: {cause}") from None


def gaussian_problem(task: Any) -> Any:
    """The exact `GaussianInverseProblem` of a Gaussian-field task (`GaussianProblemTask.problem`), else None."""
    return getattr(task, "problem", None)


def check_writable(out: Path) -> None:
    """Create out/samples and out/grids, or ValueError naming the directory."""
    try:
        for sub in ("samples", "grids"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        from msdiff.cli import ENVIRONMENT_ERRNOS

        if e.errno in ENVIRONMENT_ERRNOS:  # disk full, read-only, permission: an environment error naming the path
            raise OSError(e.errno, f"--output_dir not writable ({e.strerror})", e.filename or str(out)) from None
        raise ValueError(f"--output_dir {out}: not writable ({e.strerror or type(e).__name__})") from None


def build_metrics(task: Any, weights_dir: Optional[str], draws: int = 1, download: bool = False):
    """`ConditionalSampleMetrics` with the pretrained LPIPS/Inception nets when found (else unavailable).
    download=True first fetches missing weight files from their official locations
    (`msdiff.metric_weights`); a failed download leaves the metric unavailable, with the reason."""
    from msdiff.metric_weights import download_weights
    from msdiff.metrics import (ALEXNET_FILE, INCEPTION_FILE, ConditionalSampleMetrics, WeightsUnavailable,
                                load_inception, load_lpips)

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
    return ConditionalSampleMetrics(task=MaskedConsistency(task) if task is not None else None,
                                    features=nets["features"], lpips=nets["lpips"], unavailable=notes, draws=draws)


# ---- devices, output directory, provenance -------------------------------------------------------------
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


OUTPUTS = ("samples", "grids", "translated", "metrics.json", "metrics.md")  # what sample.py writes in a run


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """The output-directory rule: a non-empty --output_dir is refused unless overwrite=True, which
    removes what an earlier sample.py run wrote there (OUTPUTS: samples/, grids/, translated/,
    metrics.json, metrics.md) so that old and new samples never mix; other files are left alone."""
    import shutil

    if not out.is_dir():
        if out.exists():
            raise ValueError(f"--output_dir {out}: exists and is not a directory")
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--output_dir {out}: not empty ({shown}); choose a new directory or pass --overwrite "
                         "to replace an earlier sample.py run there")
    try:
        for name in OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    except OSError as e:
        raise ValueError(f"--output_dir {out}: cannot remove the earlier run's {p.name} "
                         f"({e.strerror or type(e).__name__})") from None


def checkpoint_step(ckpt_path: str) -> Optional[int]:
    """The optimizer step a train.py checkpoint (its "global_step") or an inference file (the step of
    the checkpoint it was exported from, when recorded) was saved at; None if not recorded."""
    obj = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    step = obj.get("global_step") if isinstance(obj, dict) else None
    if step is None and isinstance(obj, dict) and isinstance(obj.get("msdiff"), dict):
        step = obj["msdiff"].get("global_step")
    return None if step is None else int(step)


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
    """Lightning predict wrapper: K draws per condition, PNGs, a grid and metric updates per batch.

    `guidance` is None, a score-wrapping guidance (`score_fn(estimator, net, y, generator)`) or a
    sampler-replacing one (`sample(estimator, net, y, task, mask, generator, x_channels)`)."""

    def __init__(self, system: ScoreSystem, sampler: Any, guidance: Any, metrics: Any, task: Any, out: Path,
                 draws: int, seed: int, use_ema: bool, total: int, keep_raw: bool) -> None:
        super().__init__()
        self.system, self.metrics, self.task = system, metrics, task
        self.sampler, self.guidance, self.out = sampler, guidance, out
        self.draws, self.seed, self.use_ema, self.total = draws, seed, use_ema, total
        self.raw: Optional[list] = [] if keep_raw else None
        self.nfe = network_evaluations(sampler, guidance)
        self.progress: Optional[SamplingProgress] = None
        self.names: dict[int, str] = {}  # condition index -> file stem, for metrics.json
        self.device_name = "cpu"
        self._hook = None

    def draw(self, y: torch.Tensor, mask: Optional[torch.Tensor], indices: list[int], k: int) -> torch.Tensor:
        """Draw k for the conditions y of the given dataset indices (raw, not clamped)."""
        est, sde = self.system.estimator, self.system.estimator.sampling_sde
        net = self.system.ema.net if self.use_ema else self.system.net
        g = example_generators(self.seed, indices, k, y.device)   # one generator per condition
        if hasattr(self.guidance, "sample"):                      # sampler-replacing (AGG)
            return self.guidance.sample(est, net, y, task=self.task, mask=mask, generator=g,
                                        x_channels=self.system.x_channels)
        if self.guidance is not None:
            score_fn = self.guidance.score_fn(est, net, y, generator=g)
        else:
            score_fn = est.score_fn(net, y, generator=g, fixed_y_noise=self.sampler.adaptive)
        shape = (y.shape[0], self.system.x_channels, *y.shape[2:])
        x_T = sde.prior_sampling(shape, generator=g, device=y.device, dtype=y.dtype)
        return self.sampler(score_fn, sde, x_T, generator=g)

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
        if self.metrics.task is not None:
            self.metrics.task.mask = mask
        self.metrics.update(samples, y, None if x is None else x.float(), index=torch.tensor(indices))
        for k in range(self.draws):
            for b, name in enumerate(names):
                save_png(samples[k, b], self.out / "samples" / f"{name}_draw{k}.png")
        save_png(make_grid(y, samples, x), self.out / "grids" / f"batch{indices[0]:05d}.png")
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


def run_sampling(system: ScoreSystem, dataset: Dataset, n: int, sampler: Any, guidance: Any, metrics: Any, task: Any,
                 out: Path, draws: int, batch_size: int, seed: int, use_ema: bool, device: str, devices: int,
                 problem: Any = None, joint: bool = True) -> Optional[dict]:
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
