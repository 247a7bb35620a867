#!/usr/bin/env python
"""Conditional sampling and the paper's evaluation for a trained msdiff checkpoint.

    python sample.py --ckpt_path CKPT --output_dir DIR [--num_images N] [--draws K]
                     [--sampler CLASS --sampler.KEY VALUE ...] [--steps S]
                     [--guidance CLASS --guidance.KEY VALUE ...] [--batch_size B] [--seed S]
                     [--split test] [--input FOLDER] [--task CLASS] [--ema true|false]
                     [--device auto|cpu|cuda] [--devices D] [--shard i/N] [--overwrite] [--weights_dir DIR]
                     [--download_weights] [--config FILE]
    python sample.py --evaluate DIR [DIR ...]             # metrics of the samples on disk (the shards of a run)
    python sample.py --ckpt_path CKPT --export PATH       # small inference file (also a --ckpt_path)
    python sample.py --ckpt_path CUT_CKPT --input FOLDER --output_dir DIR [--target FOLDER]   # CUT translation

Everything is rebuilt from the checkpoint: network with EMA weights, estimator, and the data module
(`ConditionalDataModule`: `--split` chooses `.split(name)`, `.task` gives the degradation). Outputs in
DIR (msdiff.sampling.layout): samples/<name>_draw<k>.png (one per draw), y/<name>.png and x/<name>.png
(condition and target, for other tools such as torch-fidelity or clean-fid), conditions/<name>.pt (the
exact tensors), grids/batch<b>.png ([y | draws | x]), metrics.json and metrics.md (also printed),
sample_config.yaml (the resolved settings: `--config DIR/sample_config.yaml` reruns them), manifest.json
and manifest/ (what is finished). Noise for draw k of condition i comes from a stream keyed by
(seed, i, k); the conditions are sampled in FIXED batches of --batch_size (float32 rounding depends on
the rows beside a condition), so the samples do not depend on --devices, --shard or interruptions
(msdiff.sampling.plan). --devices D starts D processes, device r sampling every D-th batch. The
metrics are computed from the files on disk (msdiff.sampling.evaluate). A Gaussian-field checkpoint
also gets the exact posterior error and the exact joint Frechet distance (msdiff.gaussian).

On a cluster: SIGUSR1/SIGTERM stop the run before its next network evaluation (every finished sample
is kept; under SLURM the job is requeued) with exit status 75; Ctrl-C exits 130. Rerunning the same
command into the same --output_dir continues: every (condition, draw) recorded in the manifest with an
intact file (sha256) and the same settings is kept, the rest is sampled; the final PNGs and metrics are
the same bit for bit as those of an uninterrupted run. Other settings are refused with one line naming
them (or --overwrite). `--shard i/N` samples only job i's share of N (scripts/slurm_sample.sbatch);
`--evaluate DIR [DIR ...]` computes metrics.json/md (into the first DIR) from the shards' directories.

--sampler and --guidance are class arguments, as in train.py's configs: any subclass of
`msdiff.samplers.Sampler` / `msdiff.guidance.Guidance`, by class name or class path, its constructor
arguments as --sampler.KEY / --guidance.KEY (`--sampler.help Heun` lists them):
    --sampler Heun --sampler.steps 50               (AdaptiveSDE, DDIM, DPMSolverPC, DPMSolverPP, EDMStochastic,
                                                     EulerMaruyama, Heun, HeunPC, PredictorCorrector,
                                                     ProbabilityFlowODE)
    --steps 50                                      shorthand for --sampler.steps 50
    --guidance ASAG --guidance.scale 1.5            (PAG, SEG, CFG alike: wrap the estimator's score)
    --guidance AGG --guidance.target IMAGE|"TEXT"   image-guided translation of the condition (AGG replaces
                                                    the sampler: --sampler/--steps with it are an error)
    --guidance AGG --guidance.consistency true      zero-shot inverse problem (task operator, y)
Without --sampler the sampler is the MSDiff reference's, PredictorCorrector with 1000 steps and snr 0.15
(`--sampler PredictorCorrector` alone takes the class's own defaults, snr 0.16); --sampler.KEY needs
--sampler CLASS before it.
--task msdiff.tasks.Inpainting (or JSON with init_args) replaces the data's degradation, so that AGG with
an unconditional prior can solve an inverse problem the checkpoint was not trained for.

Defaults are paper scale: every condition of the split, 5 draws, the reference PC sampler (2,000
network evaluations per sample). A line before the first batch states the planned cost (conditions x
draws x evaluations), a second one after the first batch-draw the estimated time; the progress bar
moves at every network evaluation (batch, draw, step, ETA). --device auto (default) uses the GPU when
torch sees one. A non-empty --output_dir that holds no run of the same settings is refused unless
--overwrite, which first removes the earlier run's outputs (msdiff.sampling.output_dir.OUTPUTS). metrics.json holds the metrics,
per-image values (per condition and draw), the checkpoint's step, the msdiff version and commit, and
the sampler/guidance config blocks and command that reproduce the run. LPIPS and UFID/JFID need
pretrained weights (their official locations are in the "unavailable" line); --download_weights
fetches missing ones (a failed download leaves the metric unavailable).

--input FOLDER: condition files instead of the test split (msdiff.sampling.conditions): low-res images for
super-resolution (upsampled by the task's nearest rule), NAME.png plus NAME_mask.png (white = known)
for inpainting, edge maps for edges. A file of the wrong size is an error naming it and the size
expected (no silent resize: it would change the degradation). Metrics needing ground truth are then
reported unavailable.

Every input (checkpoint integrity, --task, --input images and masks, CUT inputs) is checked before the
first file is written. Exit status: 0 done; 2 user error; 74 environment error (disk full, read-only,
permission: one line names the path); 75 stopped by SIGUSR1/SIGTERM (rerun to continue); 130
interrupted. Options are never abbreviated (--num_image is an error). See README "Reliability".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # before torch is imported: keep freed CPU memory in-process (msdiff/malloc.py)
    from msdiff.malloc import use_caching_malloc

    use_caching_malloc()
    from msdiff.signals import install_preemption_handlers

    install_preemption_handlers()  # from the first line: a signal during start-up or loading exits 75

from msdiff.cli import run_entry_point




def build_parser():
    from typing import Optional

    from jsonargparse import ActionConfigFile, ArgumentParser

    from msdiff.config_file import install_yaml_loader
    from msdiff.guidance import Guidance  # (the package imports every guidance: --help lists them)
    from msdiff.samplers import Sampler

    install_yaml_loader()  # --config files: bounded size and expansion, no key twice

    p = ArgumentParser(prog="sample.py", exit_on_error=False, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML of these options (e.g. an earlier run's DIR/sample_config.yaml); later flags override it")
    p.add_argument("--ckpt_path", type=Optional[str], default=None, help="train.py checkpoint or --export file")
    p.add_argument("--output_dir", type=Optional[str], default=None, help="where samples and metrics go")
    p.add_argument("--export", type=Optional[str], default=None, help="write an inference file here and exit")
    p.add_argument("--num_images", type=Optional[int], default=None, help="conditions to sample (default: all)")
    p.add_argument("--draws", type=int, default=5, help="samples per condition (paper: 5)")
    p.add_subclass_arguments(Sampler, "sampler", required=False,
                             help="the sampler: a msdiff.samplers.Sampler class with its own defaults "
                                  "(none given: PredictorCorrector, 1000 steps, snr 0.15, the MSDiff reference's)")
    p.add_argument("--steps", type=Optional[int], default=None, help="shorthand for --sampler.steps")
    p.add_subclass_arguments(Guidance, "guidance", required=False,
                             help="guidance: a msdiff.guidance.Guidance class (default: none)")
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
    p.add_argument("--shard", type=Optional[str], default=None,
                   help="i/N: sample only job i's share of N (a SLURM array); evaluate them with --evaluate")
    p.add_argument("--evaluate", type=str, nargs="+", default=None, metavar="DIR",
                   help="compute metrics.json from the samples in these output directories (no sampling)")
    return p


def parse(argv: list[str]):
    """(parser, namespace) with --steps folded into --sampler.steps; every user error is a one-line
    ValueError (a misspelt --sampler/--guidance class names the choices)."""
    from msdiff.cli import class_choice_error
    from msdiff.guidance import Guidance
    from msdiff.samplers import REFERENCE_SAMPLER, Sampler

    parser = build_parser()
    line = class_choice_error(argv, {"sampler": Sampler, "guidance": Guidance})  # before jsonargparse's report
    if line is not None:
        raise ValueError(line)
    args = parser.parse_args(argv)
    if args.evaluate:
        return parser, args
    if args.guidance is not None and _replaces_sampler(args.guidance.class_path):
        given = [f for f, v in (("--sampler", args.sampler), ("--steps", args.steps)) if v is not None]
        if given:
            name = args.guidance.class_path.rpartition(".")[2]
            raise ValueError(f"--guidance {name} replaces the sampler: {' and '.join(given)} would not be used; "
                             f"drop {' and '.join(given)} (its own step count is --guidance.steps)")
        return parser, _check_counts(args)
    if args.sampler is None:
        # the MSDiff reference's sampler (msdiff.samplers.REFERENCE_SAMPLER), set here and not as the parser's
        # default: jsonargparse keeps a previous value's init_args that a newly named class accepts, so
        # `--sampler Heun` would inherit PC's steps and time grid
        args = parser.parse_object({"sampler": REFERENCE_SAMPLER}, namespace=args)
    if args.steps is not None:
        if "steps" not in args.sampler.init_args:
            raise ValueError(f"--steps {args.steps}: sampler {args.sampler.class_path.rpartition('.')[2]} "
                             "has no step count to set")
        args.sampler.init_args.steps, args.steps = args.steps, None
    return parser, _check_counts(args)


def _check_counts(args):
    from msdiff.sampling.plan import Shard

    for key in ("draws", "batch_size", "devices"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} {getattr(args, key)}: expected a positive integer")
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num_images {args.num_images}: expected a positive integer")
    Shard.parse(args.shard)
    return args


def _replaces_sampler(class_path: str) -> bool:
    """Whether the guidance class at `class_path` (already checked by the parser) replaces the
    sampler (AGG): its `Guidance.replaces_sampler`."""
    from msdiff.cli import import_class
    from msdiff.guidance import Guidance

    cls = import_class(class_path)
    return cls is not None and issubclass(cls, Guidance) and cls.replaces_sampler


def main() -> int:
    parser, args = parse(sys.argv[1:])
    quiet_console()
    if args.evaluate:
        from msdiff.sampling.flow import evaluate_only

        return evaluate_only(args)
    if not args.ckpt_path:
        raise ValueError("--ckpt_path is required (or --evaluate DIR [DIR ...])")
    built = parser.instantiate(args)  # constructor errors before anything is loaded
    sampler, guidance = built.sampler, built.guidance

    # ---- loading: the trained run (the file read once, CRC-checked once), its data and task -------------
    from msdiff.run import TrainedRun
    from msdiff.sampling.conditions import FolderConditions
    from msdiff.sampling.inference_file import write_inference_file
    from msdiff.sampling.loop import resolve_device

    args.device = resolve_device(args.device, args.devices)  # issue 14: --device auto; resolved here, once
    run = TrainedRun.open(args.ckpt_path)  # the file read once, CRC-checked once (issue 25)
    if run.kind == "cut":
        return plain_signal_actions() or translate(args, run)
    system, step = run.system(), run.step
    if args.export:
        stopped = plain_signal_actions()
        if stopped:
            return stopped
        path = write_inference_file(args.export, run.config, system.ema.net.state_dict(),
                                    system.estimator.state_dict(), global_step=step)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if not args.output_dir:
        raise ValueError("--output_dir is required (or --export PATH)")
    task = run.task(args.task)
    if args.input:
        size = system.net.image_size
        dataset = FolderConditions(args.input, task, (system.x_channels, size, size))
    else:
        dataset = run.split(args.split, args.task)
    # ---- sampling: the system and the dataset are built ------------------------------------------------
    from msdiff.sampling.flow import sample_and_evaluate

    return sample_and_evaluate(parser, args, system, dataset, task, step, sampler, guidance,
                               script=str(Path(__file__).resolve()))


def plain_signal_actions() -> Optional[int]:
    """For what sample.py cannot continue (a CUT translation, --export): 75 when SIGUSR1/SIGTERM
    already arrived (nothing is written then); else None, with the signals' default actions back
    (a later signal ends the process at once, as without sample.py's handlers)."""
    import signal

    from msdiff import signals
    from msdiff.callbacks import PREEMPTED_EXIT_CODE

    if signals.preemption_signal() is not None:
        return PREEMPTED_EXIT_CODE
    for name in signals.PREEMPTION_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    return None


def quiet_console() -> None:
    """Lightning's notices and warnings that say nothing to a sample.py user (as train.py)."""
    import warnings

    from msdiff.train_feedback import quiet_lightning

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    quiet_lightning()


def translate(args, run) -> int:
    """CUT/FastCUT checkpoint: translate every image of --input into --output_dir/translated (same
    names, EMA generator when trained with one) and, with --target, report the FID against it."""
    import json

    from msdiff.atomic_io import atomic_write
    from msdiff.cut.translate import check_inputs, folder_fid, list_images, translate_folder
    from msdiff.sampling.output_dir import check_writable, prepare_output_dir

    if not args.input or not args.output_dir:
        raise ValueError("a CUT checkpoint needs --input FOLDER (source-domain images) and --output_dir DIR")
    out = Path(args.output_dir)
    check_inputs(list_images(args.input, "--input"), what="--input")  # before the first output is written
    system = run.cut_system().to(args.device)
    prepare_output_dir(out, args.overwrite)
    check_writable(out)
    written = translate_folder(system, args.input, out / "translated", batch_size=args.batch_size, device=args.device)
    result = {"num_translated": len(written)}
    if args.target:
        result.update(folder_fid(out / "translated", args.target, weights_dir=args.weights_dir, device=args.device))
    text = json.dumps(result, indent=1)
    atomic_write(out / "metrics.json", lambda f: f.write((text + "\n").encode()))
    print(text)
    return 0


def entry() -> Optional[int]:
    """main(), where an error raised after Ctrl-C counts as the interruption (an import cut short by
    the KeyboardInterrupt can fail with another error, e.g. a RecursionError)."""
    from msdiff import signals

    try:
        return main()
    except Exception:
        if signals.interrupted():
            raise KeyboardInterrupt from None
        raise


if __name__ == "__main__":
    try:
        run_entry_point(entry, prog="sample.py")
    except SystemExit as stop:
        from msdiff.callbacks import PREEMPTED_EXIT_CODE
        from msdiff.cli import INTERRUPTED_EXIT_CODE

        if stop.code not in (PREEMPTED_EXIT_CODE, INTERRUPTED_EXIT_CODE):
            raise
        # every finished sample is on disk and recorded: leave without the interpreter's teardown
        # (seconds with torch loaded), which would eat into the grace time a cluster gives after SIGTERM
        sys.stdout.flush()
        sys.stderr.flush()
        import os

        os._exit(stop.code)
