"""The sample.py command after its system and data are built (layer 3): sample this process's share
into --output_dir, continuing an earlier run of the same settings, then evaluate from the files and
write the report; and `sample.py --evaluate DIR [DIR ...]`.

* `sampling_settings(args, step, n)`: the `SamplingSettings` of a command line.
* `sample_and_evaluate(parser, args, system, dataset, task, step, sampler, guidance, script)`: the
  run (exit status 0, 75 when SIGUSR1/SIGTERM stopped it); the system, the conditions and the
  checkpoint's step come from the caller (however it read the checkpoint).
* `evaluate_only(args)`: metrics.json/md of the samples in --evaluate's directories.
* `run_record`: metrics.json's provenance and sample_config.yaml (what runs, written at the start).
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import yaml
from jsonargparse import ArgumentParser, Namespace
from torch.utils.data import Dataset

from msdiff import signals
from msdiff.atomic_io import atomic_write
from msdiff.callbacks import PREEMPTED_EXIT_CODE, Preempted, requeue_slurm_job
from msdiff.checkpoint_file import remove_stale_temporaries
from msdiff.cli import INTERRUPTED_EXIT_CODE
from msdiff.estimators import ConditionalEstimator
from msdiff.guidance.base import Guidance
from msdiff.samplers import Sampler
from msdiff.sampling.evaluate import evaluate_dirs
from msdiff.sampling.evaluate import shared_settings
from msdiff.sampling.layout import CONFIG_FILE, TASK_FILE, tensor_bytes, write_files
from msdiff.sampling.loop import SamplingJob, build_metrics, resolve_device
from msdiff.sampling.manifest import ManifestLog
from msdiff.sampling.output_dir import check_writable, prepare_output_dir, start_run
from msdiff.sampling.plan import SamplingSettings, Shard
from msdiff.sampling.report import software_version, write_report
from msdiff.sampling.workers import DeviceWorkers, process_rank, script_command
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import Task

__all__ = ["sampling_settings", "sample_and_evaluate", "evaluate_only", "run_settings", "run_record"]


def sampling_settings(args: Namespace, step: Optional[int], n: int) -> SamplingSettings:
    """The `SamplingSettings` of this command (what defines its samples, msdiff.sampling.plan)."""
    def block(ns: Optional[Namespace]) -> Optional[dict]:  # a plain, JSON-comparable {class_path, init_args}
        return None if ns is None else json.loads(json.dumps(ns.as_dict(), sort_keys=True, default=str))

    source = f"input {Path(args.input).resolve()}" if args.input else f"split {args.split}"
    return SamplingSettings(checkpoint=str(Path(args.ckpt_path).resolve()), step=step, sampler=block(args.sampler),
                            guidance=block(args.guidance), conditions=n, draws=args.draws, batch_size=args.batch_size,
                            seed=args.seed, ema=args.ema, source=source, task=args.task, device=args.device)


def sample_and_evaluate(parser: ArgumentParser, args: Namespace, system: ScoreSystem, dataset: Dataset,
                        task: Optional[Task], step: Optional[int], sampler: Optional[Sampler],
                        guidance: Optional[Guidance], script: str) -> int:
    """Sample this process's share into --output_dir (continuing an earlier run of the same
    settings), then, for a whole run, compute the metrics from the files and write the report.
    Returns 0, 75 (PREEMPTED_EXIT_CODE) when SIGUSR1/SIGTERM stopped it, 130 for a device process
    stopped by Ctrl-C (process 0 prints the one line). `script`: sample.py's path (re-run by the
    processes of --devices)."""
    out, shard = Path(args.output_dir), Shard.parse(args.shard)
    rank, _ = process_rank()
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    settings = sampling_settings(args, step, n)
    workers = DeviceWorkers(script_command(script), args.devices)
    if signals.preemption_signal() is not None:  # received while loading: stop before writing anything
        return _stopped(out, rank, workers)
    job = SamplingJob(system, dataset, task, sampler, guidance, settings, out, shard=shard, rank=rank,
                      world=args.devices, device=args.device, progress=rank == 0,
                      keep_raw=task is not None and task.gaussian_problem() is not None)
    log = None
    try:  # the log (one writer per share) is taken before anything is written: a second writer stops there
        if rank == 0:
            continued = prepare_output_dir(out, args.overwrite, settings)  # continues a run of the same settings
            check_writable(out)  # after every input is read and checked: nothing is written for bad input
            log = ManifestLog(out, job.log_name)
            _start_outputs(parser, args, out, settings, shard, task, continued)
            if args.devices > 1:
                workers.start()
        t0 = time.perf_counter()
        job.run(log)
    except Preempted:
        return _stopped(out, rank, workers)
    except KeyboardInterrupt:
        if rank != 0:
            return INTERRUPTED_EXIT_CODE  # quietly: process 0 says it
        workers.stop(2)
        raise
    except BaseException:
        workers.stop(2)
        raise
    finally:
        if log is not None:
            log.close()
    if rank != 0:
        return 0
    codes = workers.wait()
    if PREEMPTED_EXIT_CODE in codes:
        return _stopped(out, rank, workers)
    failed = [(r + 1, c) for r, c in enumerate(codes) if c != 0]
    if failed:
        raise ValueError(f"device process {failed[0][0]} exited with status {failed[0][1]} (its error is above); "
                         "the samples of the others are kept: rerun the same command to continue")
    if shard.count > 1:
        print(f"sample.py: shard {shard} done in {out}; once every shard is done, compute the metrics with: "
              f"python sample.py --evaluate DIR [DIR ...] (the --output_dir of each shard)", file=sys.stderr)
        return 0

    try:
        result = evaluate_dirs([out], lambda t, k: build_metrics(t, args.weights_dir, k, download=args.download_weights),
                               device=args.device)
    except Preempted:
        return _stopped(out, rank, workers)
    nfe = (guidance.nfe(sampler) if guidance is not None else
           (None if sampler.nfe is None else int(sampler.nfe)))
    result["settings"] = run_settings(args, sampler, guidance, system.estimator, n, nfe,
                                      round(time.perf_counter() - t0, 2))
    result.update(run_record(parser, args, step, out))  # issue 14
    print(write_report(result, out))
    return 0


def _start_outputs(parser: ArgumentParser, args: Namespace, out: Path, settings: SamplingSettings, shard: Shard,
                   task: Optional[Task], continued: bool) -> None:
    """Process 0, before sampling: manifest.json for a new run (else the hidden temporaries a SIGKILL
    left, unless shards may share the directory), task.pt and sample_config.yaml (what runs)."""
    if not continued:
        start_run(out, settings)
    elif shard.count == 1:
        for sub in ("samples", "raw", "conditions", "x", "y", "mask", "grids", "."):
            remove_stale_temporaries(out / sub)
    write_files(out, {TASK_FILE: tensor_bytes(task)}, durable=True)
    write_files(out, {CONFIG_FILE: parser.dump(args, skip_unset=False).encode()}, durable=True)


def _stopped(out: Path, rank: int, workers: DeviceWorkers) -> int:
    """After SIGUSR1/SIGTERM: process 0 forwards the signal to the device processes, waits for them,
    requeues the SLURM job and says so in one line; exit status 75."""
    if rank == 0:
        workers.stop(signals.preemption_signal() or 15)
        requeue_slurm_job()
        print(f"sample.py: stopped by a preemption signal; every finished sample is kept in {out}: rerun the same "
              "command to continue", file=sys.stderr, flush=True)
    return PREEMPTED_EXIT_CODE


def evaluate_only(args: Namespace) -> int:
    """sample.py --evaluate DIR [DIR ...]: metrics.json/md of the samples in DIRs (written into the first)."""

    dirs = [Path(d) for d in args.evaluate]
    recorded = shared_settings(dirs)
    device = resolve_device(args.device, 1)
    try:
        result = evaluate_dirs(dirs, lambda t, k: build_metrics(t, args.weights_dir, k, download=args.download_weights),
                               device=device)
    except Preempted:
        print("sample.py: --evaluate stopped by a preemption signal; nothing was written: rerun it", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    config_file = dirs[0] / CONFIG_FILE
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    sampler = (recorded.get("sampler") or {}).get("class_path", "")
    guidance = (recorded.get("guidance") or {}).get("class_path")
    result["settings"] = {"ckpt_path": recorded["checkpoint"], "num_images": recorded["conditions"],
                          "draws": recorded["draws"], "seed": recorded["seed"], "seconds": None,
                          "sampler": (guidance if sampler == "" else sampler).rpartition(".")[2],
                          "guidance": None if guidance is None else guidance.rpartition(".")[2],
                          "nfe_per_sample": None, "evaluated": [str(d) for d in dirs]}
    result.update({"checkpoint": {"path": recorded["checkpoint"], "global_step": recorded["step"]},
                   "software": software_version(), "command": _command(), "config": config})
    print(write_report(result, dirs[0]))
    return 0


def run_settings(args: Namespace, sampler: Optional[Sampler], guidance: Optional[Guidance],
                 estimator: ConditionalEstimator, n: int, nfe: Optional[int], seconds: float) -> dict:
    """metrics.json's "settings": the options, the sampler/guidance that ran, the cost and the time."""
    settings = {k: v for k, v in vars(args).items() if k not in ("sampler", "guidance", "config", "steps", "evaluate")
                and not k.startswith("__")}
    settings.update(sampler=type(guidance if guidance is not None and guidance.replaces_sampler else sampler).__name__,
                    guidance=type(guidance).__name__ if guidance is not None else None,
                    nfe_per_sample=nfe, seconds=seconds, num_images=n)
    if guidance is not None:
        settings.update(guidance.record(estimator))
    return settings


def _command() -> str:

    return shlex.join(["python", "sample.py", *sys.argv[1:]])


def run_record(parser: ArgumentParser, args: Namespace, step: Optional[int], out: Path) -> dict:
    """metrics.json's provenance: the checkpoint and its step, the msdiff version/commit, the command,
    and the resolved settings (`config`: every option, the sampler and guidance as {class_path,
    init_args} blocks with defaults included), also written to out/sample_config.yaml, which
    `--config` reads back."""

    text = parser.dump(args, skip_unset=False)
    atomic_write(out / CONFIG_FILE, lambda f: f.write(text.encode()))
    return {"checkpoint": {"path": str(Path(args.ckpt_path).resolve()), "global_step": step},
            "software": software_version(), "command": _command(), "config": yaml.safe_load(text)}
