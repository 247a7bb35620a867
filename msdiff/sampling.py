"""What `sample.py` runs (layer 3, Lightning): rebuild a checkpoint, sample K draws per condition
through Lightning's predict loop, write PNGs and grids, accumulate the paper's metrics.

* `load_system(ckpt_path)`: a train.py checkpoint (`msdiff.systems.score.load_score_system`) or an
  inference file (`msdiff.export`), as a `ScoreSystem` in eval mode plus its stored config.
* `build_data(cfg, split)`: the checkpoint's `ConditionalDataModule`, its split and its task
  (`.split(name)`, `.task`); `gaussian_problem(task)` is the exact problem of a Gaussian-field task.
* `run_sampling(...)`: one `Trainer.predict` over the conditions. Draw k of condition i uses one
  generator per row seeded by (seed, i, k) (`msdiff.export.example_generators`), so samples do not
  depend on the batch size or the number of devices. Samples are clamped to [0, 1] and quantised for
  PNGs and metrics; the exact Gaussian-field evaluation uses the raw (unclamped) draws, since the
  field's values are not confined to [0, 1].
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from msdiff.export import example_generators, is_inference_file, make_grid, save_png
from msdiff.sampling_guidance import network_evaluations
from msdiff.sampling_inputs import MaskedConsistency
from msdiff.systems.score import ScoreSystem, instantiate_config, load_score_system

__all__ = ["load_system", "build_data", "gaussian_problem", "check_writable", "build_metrics", "SamplingModule",
           "run_sampling"]


# ---- loading --------------------------------------------------------------------------------------
def load_system(ckpt_path: str) -> tuple[ScoreSystem, dict]:
    """(ScoreSystem in eval mode, its {"model", "data"} config) from a train.py checkpoint or an
    inference file; ValueError naming the file when it is neither."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"--ckpt_path {path}: no such file")
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
        raise ValueError(f"--output_dir {out}: not writable ({e.strerror or type(e).__name__})") from None


def build_metrics(task: Any, weights_dir: Optional[str], draws: int = 1):
    """`ConditionalSampleMetrics` with the pretrained LPIPS/Inception nets when found (else unavailable)."""
    from msdiff.metrics import ConditionalSampleMetrics, WeightsUnavailable, load_inception, load_lpips

    notes, nets = {}, {}
    for name, load, keys in (("lpips", load_lpips, ("lpips",)), ("features", load_inception, ("ufid", "jfid"))):
        try:
            nets[name] = load(weights_dir)
        except WeightsUnavailable as e:
            nets[name] = None
            notes.update({k: str(e) for k in keys})
    return ConditionalSampleMetrics(task=MaskedConsistency(task) if task is not None else None,
                                    features=nets["features"], lpips=nets["lpips"], unavailable=notes, draws=draws)


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
        self.bar = None

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
        if self.global_rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total * self.draws, unit="sample", dynamic_ncols=True, file=sys.stderr)
            self.bar.set_postfix(nfe_per_sample=self.nfe if self.nfe is not None else "?")

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> None:
        y, x, mask = batch["y"].float(), batch.get("x"), batch.get("mask")
        indices = [int(i) for i in batch["index"]]
        names = batch.get("name") or [f"{i:05d}" for i in indices]
        raw = torch.stack([self.draw(y, mask, indices, k) for k in range(self.draws)])  # (K, B, C, H, W)
        samples = raw.clamp(0, 1)
        if self.metrics.task is not None:
            self.metrics.task.mask = mask
        self.metrics.update(samples, y, None if x is None else x.float())
        for k in range(self.draws):
            for b, name in enumerate(names):
                save_png(samples[k, b], self.out / "samples" / f"{name}_draw{k}.png")
        save_png(make_grid(y, samples, x), self.out / "grids" / f"batch{indices[0]:05d}.png")
        if self.raw is not None:
            self.raw.append((raw.cpu(), y.cpu()))
        if self.bar is not None:
            self.bar.update(samples.shape[0] * samples.shape[1] * self.trainer.world_size)

    def on_predict_end(self) -> None:
        if self.bar is not None:
            self.bar.close()

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
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu or cuda")
    module = SamplingModule(system, sampler, guidance, metrics, task, out, draws, seed, use_ema, n,
                            keep_raw=problem is not None)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    trainer = pl.Trainer(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, inference_mode=False)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    values = metrics.compute()  # syncs across ranks
    raw = module.gathered_raw()
    if trainer.global_rank != 0:
        return None
    result = {"metrics": values, "notes": dict(metrics.notes), "nfe": module.nfe}
    if raw is not None:
        from msdiff.gaussian import joint_frechet_distance, posterior_error

        s, y = raw
        k = s.shape[0]
        exact: dict[str, Any] = {"draws": int(s.shape[0] * s.shape[1]), **posterior_error(s, y, problem)}
        if joint:
            exact["joint_frechet"] = joint_frechet_distance(s.reshape(-1, *s.shape[2:]), y.repeat(k, 1, 1, 1), problem)
        result["gaussian"] = exact
    return result
