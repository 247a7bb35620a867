#!/usr/bin/env python
"""Conditional sampling and the paper's evaluation for a trained msdiff checkpoint.

    python sample.py --ckpt_path CKPT --output_dir DIR [--num_images N] [--draws K]
                     [--sampler pc|em|ode|heun|ddim] [--steps S] [--batch_size B] [--seed S]
                     [--split test] [--input FOLDER] [--ema true|false] [--device cpu|cuda]
                     [--devices D] [--weights_dir DIR] [--guidance NAME --guidance.KEY VALUE ...]
    python sample.py --ckpt_path CKPT --export PATH       # small inference file (also a --ckpt_path)

Everything is rebuilt from the checkpoint (network with EMA weights, estimator, task, data set).
Outputs in DIR: samples/<name>_draw<k>.png (one per draw), grids/batch<b>.png ([y | draws | x]),
metrics.json and metrics.md (also printed). Noise for draw k of condition i comes from a generator
seeded by (seed, i, k), so results do not depend on --batch_size or --devices. Several devices
sample through Lightning's predict loop (DDP); each rank writes its own conditions.

--input FOLDER: condition images instead of the test split: low-res images (image_size / factor)
for super-resolution, NAME.png plus NAME_mask.png (white = known, black = hole) for inpainting,
edge maps for edges. Images of the wrong size are an error naming the file and the size expected
(no silent resize: it would change the degradation); grey-scale/RGBA files are converted to RGB.
Metrics needing ground truth are then reported unavailable.

--guidance NAME: score-wrapping guidances (objects with `score_fn(estimator, net, y, generator)`)
wrap the estimator's score; sampler-replacing ones (AGG: `agg(score_fn, sde, x_src, generator)`)
replace the sampler with y as the source. Constructor arguments come from --guidance.KEY VALUE,
typed by the class signature. Add a guidance with one line in GUIDANCES.
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from msdiff.cli import run_entry_point

GUIDANCES = {  # short name -> class path; one line per guidance
    "agg": "msdiff.guidance.agg.AGG",
    "asag": "msdiff.guidance.attention.ASAG",
    "pag": "msdiff.guidance.attention.PAG",
    "seg": "msdiff.guidance.attention.SEG",
    "cfg": "msdiff.guidance.cfg.CFG",
}
SAMPLERS = {  # name -> (class path, takes steps)
    "pc": ("msdiff.samplers.PredictorCorrector", True),
    "em": ("msdiff.samplers.EulerMaruyama", True),
    "ode": ("msdiff.samplers.ProbabilityFlowODE", False),
    "heun": ("msdiff.samplers.Heun", True),
    "ddim": ("msdiff.samplers.DDIM", True),
}


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def guidance_class(name: str) -> type:
    """The class behind `--guidance NAME`, or ValueError naming what is available."""
    if name not in GUIDANCES:
        raise ValueError(f"--guidance {name}: unknown; expected one of {', '.join(GUIDANCES)}")
    try:
        return _import(GUIDANCES[name])
    except (ImportError, AttributeError):
        raise ValueError(f"--guidance {name}: guidance {name} is not available yet ({GUIDANCES[name]} missing)") from None


def build_parser(guidance: Optional[type]):
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="sample.py", exit_on_error=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", type=str, required=True, help="train.py checkpoint or --export file")
    p.add_argument("--output_dir", type=Optional[str], default=None, help="where samples and metrics go")
    p.add_argument("--export", type=Optional[str], default=None, help="write an inference file here and exit")
    p.add_argument("--num_images", type=Optional[int], default=None, help="conditions to sample (default: all)")
    p.add_argument("--draws", type=int, default=5, help="samples per condition (paper: 5)")
    p.add_argument("--sampler", type=str, default="pc", help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=Optional[int], default=None, help="sampler steps (default: the sampler's)")
    p.add_argument("--batch_size", type=int, default=8, help="conditions per network call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=str, default="test")
    p.add_argument("--input", type=Optional[str], default=None, help="folder of condition images")
    p.add_argument("--ema", type=bool, default=True, help="sample with the EMA weights")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--devices", type=int, default=1, help="number of devices (DDP when > 1)")
    p.add_argument("--weights_dir", type=Optional[str], default=None, help="pretrained LPIPS/Inception weights")
    if guidance is not None:
        p.add_class_arguments(guidance, "guidance")
    return p


def split_guidance_argv(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """Remove `--guidance NAME` (or `--guidance=NAME`) from argv; return NAME and the rest."""
    out, name, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--guidance" and i + 1 < len(argv):
            name, i = argv[i + 1], i + 2
            continue
        if a.startswith("--guidance="):
            name = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    if name is None and any(a.startswith("--guidance.") for a in out):
        raise ValueError("--guidance.KEY given without --guidance NAME")
    return name, out


# ---- loading ----------------------------------------------------------------------------------
def load_system(ckpt_path: str, device: str = "cpu"):
    """(ScoreSystem in eval mode, config dict) from a train.py checkpoint or an inference file."""
    import torch

    from msdiff.export import is_inference_file
    from msdiff.systems.score import ScoreSystem, instantiate_config, load_score_system

    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"--ckpt_path {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"--ckpt_path {path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if is_inference_file(obj):
        cfg = {k: v for k, v in obj["msdiff"].items() if k != "format"}
        system = instantiate_config(cfg["model"], ScoreSystem)
        try:
            system.ema.net.load_state_dict(obj["net"])
            system.net.load_state_dict(obj["net"])  # the file holds the EMA weights only
            system.estimator.load_state_dict(obj["estimator"])
        except RuntimeError as e:
            raise ValueError(f"--ckpt_path {path}: weights do not match the stored config ({str(e).splitlines()[0]})") from None
        system.msdiff_config = cfg
        return system.to(device).eval(), cfg
    if not (isinstance(obj, dict) and "msdiff" in obj and "state_dict" in obj):
        raise ValueError(f"--ckpt_path {path}: not an msdiff checkpoint (no 'msdiff' config entry); "
                         "expected a train.py checkpoint or a sample.py --export file")
    del obj
    system = load_score_system(path, map_location="cpu")
    return system.to(device).eval(), system.msdiff_config


def build_task(data_cfg: Optional[dict]):
    """The task (msdiff.tasks) from the data config's `task` entry, or None."""
    from msdiff.systems.score import instantiate_config
    from msdiff.tasks import Task

    task_cfg = ((data_cfg or {}).get("init_args") or {}).get("task")
    return instantiate_config(task_cfg, Task) if isinstance(task_cfg, dict) else None


def build_dataset(data_cfg: Optional[dict], split: str):
    """The `split` data set described by the checkpoint's data config (a Dataset or a DataModule)."""
    import lightning.pytorch as pl
    from torch.utils.data import Dataset

    from msdiff.systems.score import instantiate_config

    if not data_cfg or "class_path" not in data_cfg:
        raise ValueError("checkpoint has no data config; pass --input FOLDER with condition images")
    cls = _import(data_cfg["class_path"])
    if issubclass(cls, Dataset):
        cfg = {"class_path": data_cfg["class_path"], "init_args": {**data_cfg.get("init_args", {}), "split": split}}
        return instantiate_config(cfg, Dataset)
    dm = instantiate_config(data_cfg, pl.LightningDataModule)
    if callable(getattr(dm, "dataset", None)):
        return dm.dataset(split)
    dm.setup("test" if split == "test" else "validate" if split == "val" else "fit")
    for name in (f"{split}_dataset", f"{split}_set", f"data_{split}"):
        if getattr(dm, name, None) is not None:
            return getattr(dm, name)
    return getattr(dm, f"{ {'test': 'test', 'val': 'val'}.get(split, 'train') }_dataloader")().dataset


def _channels_and_size(system) -> tuple[int, int]:
    net_cfg = ((system.msdiff_config or {}).get("model", {}).get("init_args", {}).get("net") or {}).get("init_args", {})
    return system.x_channels, int(net_cfg.get("image_size", 160))


def check_writable(out: Path) -> None:
    try:
        for sub in ("samples", "grids"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--output_dir {out}: not writable ({e.strerror or type(e).__name__})") from None


def build_metrics(task, weights_dir: Optional[str]):
    from msdiff.export import MaskedConsistency
    from msdiff.metrics import ConditionalSampleMetrics, WeightsUnavailable, load_inception, load_lpips

    notes, nets = {}, {}
    for name, load, keys in (("lpips", load_lpips, ("lpips",)), ("features", load_inception, ("ufid", "jfid"))):
        try:
            nets[name] = load(weights_dir)
        except WeightsUnavailable as e:
            nets[name] = None
            notes.update({k: str(e) for k in keys})
    return ConditionalSampleMetrics(task=MaskedConsistency(task) if task is not None else None,
                                    features=nets["features"], lpips=nets["lpips"], unavailable=notes)


# ---- the predict loop -------------------------------------------------------------------------
def _make_sampling_module():
    import lightning.pytorch as pl
    import torch

    from msdiff.export import example_generators, make_grid, save_png

    class SamplingModule(pl.LightningModule):
        """Lightning predict wrapper: K draws per condition, PNGs, grids and metric updates per batch."""

        def __init__(self, system, sampler, guidance, metrics, out: Path, draws: int, seed: int,
                     use_ema: bool, total: int, keep_for_gaussian: bool) -> None:
            super().__init__()
            self.system, self.metrics = system, metrics
            self.sampler, self.guidance, self.out = sampler, guidance, out
            self.draws, self.seed, self.use_ema, self.total = draws, seed, use_ema, total
            self.kept: list = [] if keep_for_gaussian else None
            self.bar = None

        def _draw(self, y, indices, k: int):
            est, sde = self.system.estimator, self.system.estimator.sampling_sde
            net = self.system.ema.net if self.use_ema else self.system.net
            g = example_generators(self.seed, indices, k, y.device)   # one generator per condition
            wrap = getattr(self.guidance, "score_fn", None)
            score_fn = wrap(est, net, y, generator=g) if callable(wrap) else est.score_fn(net, y, generator=g)
            if self.guidance is not None and not callable(wrap):      # sampler-replacing (AGG)
                return self.guidance(score_fn, sde, y, generator=g)
            shape = (y.shape[0], self.system.x_channels, *y.shape[2:])
            x_T = sde.prior_sampling(shape, generator=g, device=y.device, dtype=y.dtype)
            return self.sampler(score_fn, sde, x_T, generator=g)

        def on_predict_start(self) -> None:
            if self.global_rank == 0:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total * self.draws, unit="sample", dynamic_ncols=True, file=sys.stderr)

        @torch.no_grad()
        def predict_step(self, batch: dict, batch_idx: int) -> None:
            y, x, mask = batch["y"].float(), batch.get("x"), batch.get("mask")
            indices = [int(i) for i in batch["index"]]
            names = batch.get("name") or [f"{i:05d}" for i in indices]
            samples = torch.stack([self._draw(y, indices, k).clamp(0, 1) for k in range(self.draws)])  # (K, B, ...)
            task = self.metrics.task
            if task is not None:
                task.mask = mask
            self.metrics.update(samples, y, None if x is None else x.float())
            for k in range(self.draws):
                for b, name in enumerate(names):
                    save_png(samples[k, b], self.out / "samples" / f"{name}_draw{k}.png")
            save_png(make_grid(y, samples, x), self.out / "grids" / f"batch{indices[0]:05d}.png")
            if self.kept is not None:
                self.kept.append((samples.cpu(), y.cpu()))
            if self.bar is not None:
                self.bar.update(samples.shape[0] * samples.shape[1] * self.trainer.world_size)
                self.bar.set_postfix(nfe=getattr(self.sampler, "nfe", "?"))

        def on_predict_end(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return SamplingModule


def run_sampling(system, dataset, n: int, sampler, guidance, metrics, out: Path, draws: int, batch_size: int,
                 seed: int, use_ema: bool, device: str, devices: int, problem=None) -> Optional[dict]:
    """Sample `draws` per condition for the first n items of `dataset`; rank 0 returns the results."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Subset

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu or cuda")
    module = _make_sampling_module()(system, sampler, guidance, metrics, out, draws, seed, use_ema, n,
                                     keep_for_gaussian=problem is not None)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    trainer = pl.Trainer(accelerator=device, devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, inference_mode=False)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    values = metrics.compute()  # syncs across ranks
    if trainer.global_rank != 0:
        return None
    result = {"metrics": values, "notes": dict(metrics.notes), "nfe": getattr(sampler, "nfe", None)}
    if problem is not None and module.kept:
        import torch

        from msdiff.gaussian import joint_frechet_distance, posterior_error

        s = torch.cat([a for a, _ in module.kept], dim=1)
        y = torch.cat([b for _, b in module.kept])
        k = s.shape[0]
        result["gaussian"] = {**posterior_error(s, y, problem),
                              "joint_frechet": joint_frechet_distance(s.reshape(-1, *s.shape[2:]), y.repeat(k, 1, 1, 1), problem)}
    return result


def main() -> int:
    name, argv = split_guidance_argv(sys.argv[1:])
    guidance_cls = guidance_class(name) if name else None
    parser = build_parser(guidance_cls)
    args = parser.parse_args(argv)
    if args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {args.sampler}: expected one of {', '.join(SAMPLERS)}")
    for key in ("draws", "batch_size", "devices"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} {getattr(args, key)}: expected a positive integer")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: expected a positive integer")
    system, cfg = load_system(args.ckpt_path)
    if args.export:
        from msdiff.export import write_inference_file

        path = write_inference_file(args.export, cfg, system.ema.net.state_dict(), system.estimator.state_dict())
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if not args.output_dir:
        raise ValueError("--output_dir is required (or --export PATH)")
    out = Path(args.output_dir)
    check_writable(out)

    from msdiff.export import FolderConditions

    task = build_task(cfg.get("data"))
    x_channels, image_size = _channels_and_size(system)
    if args.input:
        if task is None:
            raise ValueError("--input: the checkpoint's data config names no task, so conditions cannot be read")
        dataset = FolderConditions(args.input, task, image_size)
    else:
        dataset = build_dataset(cfg.get("data"), args.split)
        task = getattr(dataset, "task", None) or task
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    sampler_path, takes_steps = SAMPLERS[args.sampler]
    sampler = _import(sampler_path)(**({"steps": args.steps} if takes_steps and args.steps else {}))
    guidance = None
    if guidance_cls is not None:
        guidance = parser.instantiate_classes(args).guidance
    metrics = build_metrics(task, args.weights_dir)
    t0 = time.perf_counter()
    result = run_sampling(system, dataset, n, sampler, guidance, metrics, out, draws=args.draws,
                          batch_size=args.batch_size, seed=args.seed, use_ema=args.ema, device=args.device,
                          devices=args.devices, problem=getattr(dataset, "problem", None))
    if result is None:  # not rank 0
        return 0
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("guidance",) and not k.startswith("__")}
    result["settings"].update(sampler=args.sampler, nfe_per_sample=result.pop("nfe"), guidance=name,
                              seconds=round(time.perf_counter() - t0, 2), num_images=n)
    from msdiff.export import write_report

    print(write_report(result, out))
    return 0


if __name__ == "__main__":
    run_entry_point(main, prog="sample.py")
