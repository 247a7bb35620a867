#!/usr/bin/env python
"""Conditional sampling and the paper's evaluation for a trained msdiff checkpoint.

    python sample.py --ckpt_path CKPT --output_dir DIR [--num_images N] [--draws K]
                     [--sampler pc|em|ode|heun|heunpc|ddim] [--steps S] [--batch_size B] [--seed S]
                     [--split test] [--input FOLDER] [--task CLASS] [--ema true|false]
                     [--device auto|cpu|cuda] [--devices D] [--overwrite] [--weights_dir DIR]
                     [--download_weights] [--guidance NAME --guidance.KEY VALUE ...]
    python sample.py --ckpt_path CKPT --export PATH       # small inference file (also a --ckpt_path)
    python sample.py --ckpt_path CUT_CKPT --input FOLDER --output_dir DIR [--target FOLDER]   # CUT translation

Everything is rebuilt from the checkpoint: network with EMA weights, estimator, and the data module
(`ConditionalDataModule`: `--split` chooses `.split(name)`, `.task` gives the degradation). Outputs in
DIR: samples/<name>_draw<k>.png (one per draw), grids/batch<b>.png ([y | draws | x]), metrics.json and
metrics.md (also printed). Noise for draw k of condition i comes from a generator seeded by
(seed, i, k), so results do not depend on --batch_size or --devices (DDP through Lightning's predict
loop; device r samples and writes conditions r, r + D, ...). A Gaussian-field checkpoint also gets the
exact posterior error and the exact joint Frechet distance (msdiff.gaussian).

Defaults are paper scale: every condition of the split, 5 draws, the reference PC sampler (2,000
network evaluations per sample). A line before the first batch states the planned cost (conditions x
draws x evaluations), a second one after the first batch the estimated time; the progress bar moves
at every network evaluation (batch, draw, step, ETA). --device auto (default) uses the GPU when torch
sees one. A non-empty --output_dir is refused unless --overwrite, which first removes the earlier
run's samples/, grids/, translated/, metrics.json and metrics.md. metrics.json holds the metrics,
per-image values (per condition and draw), the checkpoint's step, the msdiff version and commit, and
the sampler/guidance config blocks and command that reproduce the run. LPIPS and UFID/JFID need
pretrained weights (their official locations are in the "unavailable" line); --download_weights
fetches missing ones (a failed download leaves the metric unavailable).

--input FOLDER: condition files instead of the test split (msdiff.sampling_inputs): low-res images for
super-resolution (upsampled by the task's nearest rule), NAME.png plus NAME_mask.png (white = known)
for inpainting, edge maps for edges. A file of the wrong size is an error naming it and the size
expected (no silent resize: it would change the degradation). Metrics needing ground truth are then
reported unavailable.

--guidance NAME (msdiff.sampling_guidance.GUIDANCES: agg, asag, pag, seg, cfg), options typed by the
class signature as --guidance.KEY VALUE:
    --guidance asag --guidance.scale 1.5            (pag, seg, cfg alike: wrap the estimator's score)
    --guidance agg --guidance.target IMAGE|"TEXT"   image-guided translation of the condition
    --guidance agg --guidance.consistency true      zero-shot inverse problem (task operator, y)
--task msdiff.tasks.Inpainting (or JSON with init_args) replaces the data's degradation, so that AGG with
an unconditional prior can solve an inverse problem the checkpoint was not trained for.

Every input (checkpoint integrity, --task, --input images and masks, CUT inputs) is checked before the
first file is written. Exit status: 0 done; 2 user error; 74 environment error (disk full, read-only,
permission: one line names the path); 130 interrupted. See README "Reliability".
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # before torch is imported: keep freed CPU memory in-process (msdiff/malloc.py)
    from msdiff.malloc import use_caching_malloc

    use_caching_malloc()

from msdiff.cli import run_entry_point

SAMPLERS = {  # name -> (class path, takes steps, fixed settings)
    "pc": ("msdiff.samplers.PredictorCorrector", True, {"snr": 0.15}),  # the MSDiff reference's snr
    "em": ("msdiff.samplers.EulerMaruyama", True, {}),
    "ode": ("msdiff.samplers.ProbabilityFlowODE", False, {}),
    "heun": ("msdiff.samplers.Heun", True, {}),
    "heunpc": ("msdiff.samplers.HeunPC", False, {}),  # 100 evaluations, PC-2000's consistency
    "ddim": ("msdiff.samplers.DDIM", True, {}),
}


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
    p.add_argument("--split", type=str, default="test", help="train, val or test")
    p.add_argument("--input", type=Optional[str], default=None, help="folder of condition images")
    p.add_argument("--task", type=Optional[str], default=None,
                   help="replace the data's task: class path or JSON {class_path, init_args} (zero-shot AGG)")
    p.add_argument("--ema", type=bool, default=True, help="sample with the EMA weights")
    p.add_argument("--device", type=str, default="auto", help="auto (the GPU when present), cpu or cuda")
    p.add_argument("--devices", type=int, default=1, help="number of devices (DDP when > 1)")
    p.add_argument("--overwrite", type=bool, default=False,
                   help="replace an earlier run in a non-empty --output_dir (default: refuse it)")
    p.add_argument("--weights_dir", type=Optional[str], default=None, help="pretrained LPIPS/Inception weights")
    p.add_argument("--download_weights", type=bool, default=False,
                   help="download missing LPIPS/Inception weights from their official locations")
    p.add_argument("--target", type=Optional[str], default=None, help="CUT: target-domain folder for FID")
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


def _check_args(args) -> None:
    if args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {args.sampler}: expected one of {', '.join(SAMPLERS)}")
    if args.steps and not SAMPLERS[args.sampler][1]:
        raise ValueError(f"--steps {args.steps}: sampler {args.sampler!r} has no step count to set")
    for key in ("draws", "batch_size", "devices"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} {getattr(args, key)}: expected a positive integer")
    for key in ("steps", "num_images"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"--{key} {getattr(args, key)}: expected a positive integer")


def main() -> int:
    from msdiff.sampling_guidance import guidance_class

    name, argv = split_guidance_argv(sys.argv[1:])
    guidance_cls = guidance_class(name) if name else None
    parser = build_parser(guidance_cls)
    args = parser.parse_args(argv)
    _check_args(args)
    guidance = parser.instantiate_classes(args).guidance if guidance_cls is not None else None  # fail early

    import importlib

    from msdiff.export import write_inference_file, write_report
    from msdiff.sampling import (build_data, build_metrics, check_writable, checkpoint_step, gaussian_problem,
                                 launch_rank, load_system, prepare_output_dir, resolve_device, run_sampling)
    from msdiff.sampling_inputs import FolderConditions

    from msdiff.cut.system import is_cut_checkpoint

    args.device = resolve_device(args.device, args.devices)  # issue 14: --device auto
    if Path(args.ckpt_path).is_file() and is_cut_checkpoint(args.ckpt_path):
        return translate(args)
    system, cfg = load_system(args.ckpt_path)
    step = checkpoint_step(args.ckpt_path)
    if args.export:
        path = write_inference_file(args.export, cfg, system.ema.net.state_dict(), system.estimator.state_dict(),
                                    global_step=step)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if not args.output_dir:
        raise ValueError("--output_dir is required (or --export PATH)")
    out = Path(args.output_dir)
    dataset, task = build_data(cfg, None if args.input else args.split, args.task)
    if args.input:
        size = int(cfg["model"]["init_args"]["net"]["init_args"]["image_size"])
        dataset = FolderConditions(args.input, task, (system.x_channels, size, size))
    if launch_rank() == 0:  # the output-directory rule (DDP children find rank 0's folders)
        prepare_output_dir(out, args.overwrite)
    check_writable(out)  # after every input is read and checked: nothing is written for bad input
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    path, takes_steps, settings = SAMPLERS[args.sampler]
    module, _, cls = path.rpartition(".")
    sampler_cls = getattr(importlib.import_module(module), cls)
    sampler_args = {**settings, **({"steps": args.steps} if takes_steps and args.steps else {})}
    sampler = sampler_cls(**sampler_args)
    metrics = build_metrics(task, args.weights_dir, args.draws, download=args.download_weights)
    t0 = time.perf_counter()
    result = run_sampling(system, dataset, n, sampler, guidance, metrics, task, out, draws=args.draws,
                          batch_size=args.batch_size, seed=args.seed, use_ema=args.ema, device=args.device,
                          devices=args.devices, problem=gaussian_problem(task), joint=not args.input)
    if result is None:  # not rank 0
        return 0
    settings = {k: v for k, v in vars(args).items() if k != "guidance" and not k.startswith("__")}
    settings.update(sampler="agg" if hasattr(guidance, "sample") else args.sampler, guidance=name,
                    guidance_options=repr(guidance) if guidance is not None else None,
                    nfe_per_sample=result.pop("nfe"), seconds=round(time.perf_counter() - t0, 2), num_images=n)
    if getattr(guidance, "resolved_prior", None):
        settings["agg_prior"] = guidance.resolved_prior
    result["settings"] = settings
    result.update(run_record(args, step, path, sampler_cls, sampler_args, guidance_cls))  # issue 14
    print(write_report(result, out))
    return 0


def run_record(args, step: Optional[int], sampler_path: str, sampler_cls: type, sampler_args: dict,
               guidance_cls: Optional[type]) -> dict:
    """metrics.json's provenance: the checkpoint and its step, the msdiff version/commit, the command,
    and the sampler and guidance as {class_path, init_args} blocks (every argument, defaults
    included) that rebuild them."""
    import inspect
    import shlex

    from msdiff.export import software_version

    bound = inspect.signature(sampler_cls).bind(**sampler_args)
    bound.apply_defaults()
    config = {"sampler": {"class_path": sampler_path, "init_args": dict(bound.arguments)}, "guidance": None}
    if guidance_cls is not None:
        config["guidance"] = {"class_path": f"{guidance_cls.__module__}.{guidance_cls.__qualname__}",
                              "init_args": args.guidance.as_dict()}
    return {"checkpoint": {"path": str(Path(args.ckpt_path).resolve()), "global_step": step},
            "software": software_version(), "command": shlex.join(["python", "sample.py", *sys.argv[1:]]),
            "config": config}


def translate(args) -> int:
    """CUT/FastCUT checkpoint: translate every image of --input into --output_dir/translated (same
    names, EMA generator when trained with one) and, with --target, report the FID against it."""
    import json

    from msdiff.sampling import check_writable, prepare_output_dir
    from msdiff.cut.system import load_cut_system
    from msdiff.cut.translate import folder_fid, translate_folder

    if not args.input or not args.output_dir:
        raise ValueError("a CUT checkpoint needs --input FOLDER (source-domain images) and --output_dir DIR")
    out = Path(args.output_dir)
    from msdiff.cut.translate import check_inputs, list_images

    check_inputs(list_images(args.input, "--input"), what="--input")  # before the first output is written
    system = load_cut_system(args.ckpt_path, map_location=args.device)
    prepare_output_dir(out, args.overwrite)
    check_writable(out)
    written = translate_folder(system, args.input, out / "translated", batch_size=args.batch_size, device=args.device)
    result = {"num_translated": len(written)}
    if args.target:
        result.update(folder_fid(out / "translated", args.target, weights_dir=args.weights_dir, device=args.device))
    text = json.dumps(result, indent=1)
    from msdiff.atomic_io import atomic_write

    atomic_write(out / "metrics.json", lambda f: f.write((text + "\n").encode()))
    print(text)
    return 0


if __name__ == "__main__":
    run_entry_point(main, prog="sample.py")
