"""One benchmark command (issue 9): measure speed, memory and sampling accuracy and write the
generated summary at the top of a results file: runs/benchmarks/RESULTS.md (a copy of the tracked
benchmarks/RESULTS.md, whose other blocks it keeps), or benchmarks/RESULTS.md itself with
--update-results, so that a quick or partial run never rewrites the tracked file by accident.

    .venv/bin/python -m benchmarks.run [--quick] [--device cpu|cuda] [--ckpt PATH] [--only SECTION ...]
                                       [--repeats N] [--threads N] [--unet-batches 1 4] [--update-results]
                                       [--output PATH] [--system-malloc]

Sections (``--only`` runs a subset and rewrites only those; the others keep their last results):
  unet       SR-160 U-Net (6 -> 6, CMDE loss): training step (forward + backward + fused Adam + EMA) and
             no-grad forward at batch 1 and 4: median seconds, images/s, peak memory (fresh process
             per configuration), FLOPs (torch.utils.flop_counter) and achieved FLOP/s as a fraction of
             a dense fp32 matmul measured in the same process just before each timed call;
             activation checkpointing memory (sections_unet.py).
  attention  fused SDPA vs naive attention at every attention shape the configs use (sections_unet.py).
  data       decoded + degraded examples/s per worker (one process, one thread) per dataset.
  samplers   per sampler at 160x160, batch 1: NFE per sample, seconds per sample = cost per NFE (one
             sample with 1 step / its NFE, samplers timed in turn) x NFE, peak memory of one sample
             with 1 and with 2 steps (equal when memory does not grow with steps) (sections_sampling.py).
  gaussian   posterior error vs NFE on the exact Gaussian field, VE and VP (gaussian_samplers.py).
  ckpt       with --ckpt: consistency PSNR, PSNR and diversity per sampler on a trained checkpoint.
  cut        CUT and FastCUT seconds/iteration and peak memory at 256x256 (from cut_step.py).
  gpu        (issue 15; meant for --device cuda) SR-160 at batch 32: the network-alone training rate in
             fp32 / TF32 / bf16 (with and without channels_last and torch.compile), train.py's rate for
             the same configuration (pipeline efficiency = the ratio), sampler cost per network
             evaluation vs a bare forward, peak memory, the device name (sections_gpu.py). The
             default set of --device cuda (`python -m benchmarks.run --device cuda`); on a CPU, name it with
             --only gpu.

``--quick`` shrinks every size (tiny U-Net, 16x16 sampling, few draws, 32x32 CUT) and measures memory
in-process, to check that the command works; its figures mean nothing. Timings on a shared machine
are noisy: quote ratios measured within one run. On a CPU shared by other jobs, ``--threads 1``
avoids the oversubscription that makes multi-threaded convolutions stall.

Like train.py, the command re-executes itself once with the glibc malloc settings of
``msdiff/malloc.py`` (freed tensor memory stays in the process), so that it measures what training
runs; ``--system-malloc`` keeps the system defaults. The header of the results says which was used.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent

if __name__ == "__main__" and "--system-malloc" not in sys.argv:  # before torch is imported (msdiff/malloc.py)
    from msdiff.malloc import use_caching_malloc

    use_caching_malloc()

from benchmarks import common  # noqa: E402
import torch  # noqa: E402

from msdiff.malloc import caching_malloc_active  # noqa: E402
from benchmarks.sections_gpu import section_gpu  # noqa: E402
from benchmarks.sections_sampling import section_ckpt, section_gaussian, section_samplers  # noqa: E402
from benchmarks.sections_unet import section_attention, section_unet  # noqa: E402

BLOCK = "benchmarks/run.py"
TITLES = {"unet": "U-Net SR-160 training step and forward", "attention": "Fused vs naive attention",
          "data": "Data pipeline (per worker)", "samplers": "Samplers at 160x160: cost",
          "gaussian": "Samplers on the Gaussian field: accuracy vs NFE",
          "ckpt": "Samplers on a trained checkpoint: consistency and diversity",
          "cut": "CUT and FastCUT at 256x256", "gpu": "GPU: training and sampling at the network's speed"}
SECTIONS = tuple(TITLES)  # the order of the subsections in RESULTS.md
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "gpu")  # what a CPU run without --only measures
DEFAULT_CUDA_SECTIONS = ("gpu",)  # what `--device cuda` without --only measures


# ---- the small sections ------------------------------------------------------------------------------
def section_data(a: argparse.Namespace) -> str:
    """Examples/s of one loader worker per dataset and task (data_pipeline.py)."""
    from benchmarks import data_pipeline as dp

    n = 6 if a.quick else 300
    torch.set_num_threads(1)
    rows = ["| dataset and task | examples | examples/s per worker (wall) | examples per CPU-second |",
            "|---|---|---|---|"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dp.write_files(Path(tmp), n)
            for name, ds in dp.dataset_cases(Path(tmp), n):
                wall, cpu = dp.per_worker_rates(ds)
                rows.append(f"| {name} | {len(ds)} | {wall:,.0f} | {cpu:,.0f} |")
                print(rows[-1], flush=True)
                if name.startswith("CelebA") and "SR" in name:
                    celeba = (wall, cpu)
    finally:
        torch.set_num_threads(a.threads)
    return "\n".join([f"`dataset[(epoch, i)]` (decode, crop, resize, flip, task) over {n} synthetic files "
                      "(`data_pipeline.write_files`: 178x218 JPEGs, 256x512 pairs) in one process with one thread, as "
                      "a loader worker runs it; best of 2 passes. On a shared CPU the wall-clock rate depends on the "
                      "other jobs; the CPU-time rate is the rate of a worker that has a core.", "", *rows, "",
                      f"- Target: >= 300 examples/s per worker for CelebA-size JPEGs with SR: {celeba[0]:,.0f} (wall), "
                      f"{celeba[1]:,.0f} (per CPU-second) -> **{'met' if celeba[1] >= 300 else 'missed'}** (judged on "
                      f"CPU time{'' if celeba[0] >= 300 else '; the wall-clock rate was below 300 on this shared machine'})."])


def section_cut(a: argparse.Namespace) -> str:
    """CUT and FastCUT seconds per iteration and peak memory (cut_step.py)."""
    path = Path(__file__).with_name("cut_step.py")
    if not path.exists():
        return "Skipped: benchmarks/cut_step.py is not present."
    size, iters = (32, 1) if a.quick else (256, a.repeats)
    rows = ["| variant | s / iteration | peak MiB |", "|---|---|---|"]
    res = {}
    for name in ("CUT", "FastCUT"):
        if a.quick:
            from benchmarks import cut_step
            r = cut_step.run_one(name, iters, size, a.device)
        else:
            r = common.call_in_subprocess("benchmarks.cut_step:run_one", dict(name=name, iters=iters, size=size, device=a.device))
        res[name] = r
        rows.append(f"| {name} | {r['s_per_iter']:.3f} | {r['peak_mib']:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join([f"`cut_step.run_one`: one D step + one G/F step of `CUTSystem.training_step`, batch 1, "
                      f"{size}x{size}, median of {iters} after a warm-up; " + ("in-process (quick)" if a.quick else
                      "one fresh process per variant") + " (CPU: peak RSS of that process).", "", *rows, "",
                      f"FastCUT / CUT time: x{res['FastCUT']['s_per_iter'] / res['CUT']['s_per_iter']:.2f}."])


# section name -> function(args) returning its markdown; "gaussian" also returns the ODE's NFE, which
# "samplers" takes as a second argument (see main)
SECTION_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "unet": section_unet, "attention": section_attention, "data": section_data, "samplers": section_samplers,
    "gaussian": section_gaussian, "ckpt": section_ckpt, "cut": section_cut, "gpu": section_gpu}


# ---- RESULTS.md --------------------------------------------------------------------------------------
def header(a: argparse.Namespace, env: dict) -> str:
    """The header sub-block: how the summary is generated, the command line and the environment."""
    cmd = " ".join(["python -m benchmarks.run", *sys.argv[1:]])
    env_line = "; ".join(f"{k} {v}" for k, v in env.items())
    malloc = ("glibc caching settings of `msdiff/malloc.py` active (as train.py runs)" if caching_malloc_active()
              else "system defaults (the caching settings of `msdiff/malloc.py` were not active)")
    return "\n".join([
        "## Summary (benchmarks/run.py)", "",
        "Generated by `python -m benchmarks.run [--quick] [--device cpu|cuda] [--ckpt PATH] [--only SECTION ...]`; "
        "everything between the BEGIN/END markers of this block is rewritten, the rest of the file is left alone. "
        "Each subsection says when and how it was measured. The CPU is shared by other jobs: absolute times are "
        "pessimistic, ratios within one run are the figures to keep.", "",
        f"Last run: `{cmd}`; {env_line}.", "",
        f"CPU memory allocator: {malloc}."])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (< 1 minute)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--ckpt", default=None, help="a quickstart checkpoint for the consistency/diversity table")
    p.add_argument("--ckpt-images", type=int, default=4)
    p.add_argument("--ckpt-draws", type=int, default=4)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None)
    p.add_argument("--unet-batches", type=int, nargs="+", default=[1, 4], help="batches the U-Net section times "
                   "(memory is always measured at 1 and 4)")
    p.add_argument("--overlap", action="store_true", help="unet: measure memory while timing (faster, noisier)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 3; quick 1)")
    p.add_argument("--gpu-batch", type=int, default=32, help="gpu: batch of every measurement (SR-160; issue 15: 32)")
    p.add_argument("--gpu-workers", type=int, default=8, help="gpu: train.py loader workers")
    common.add_results_arguments(p)
    p.add_argument("--system-malloc", action="store_true", help="keep the system malloc defaults instead of "
                   "re-executing with the caching settings of msdiff/malloc.py (as train.py runs)")
    a = p.parse_args()
    try:
        a.output = common.results_path(a.output, a.update_results)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    if a.ckpt and not Path(a.ckpt).is_file():
        print(f"--ckpt {a.ckpt}: no such file", file=sys.stderr)
        return 2
    a.repeats = a.repeats or (1 if a.quick else 3)
    if a.threads or a.quick:
        torch.set_num_threads(a.threads or 1)  # quick: tiny tensors, one thread avoids oversubscription
    a.threads = torch.get_num_threads()
    env = common.environment(a.device)
    default = DEFAULT_CUDA_SECTIONS if a.device == "cuda" else DEFAULT_SECTIONS
    todo = [s for s in SECTIONS if (s in default if a.only is None else s in a.only)]
    done: dict[str, str] = {}
    ode_nfe = None
    for s in sorted(todo, key=lambda s: s != "gaussian"):  # gaussian first: the ODE's NFE feeds "samplers"
        t0 = time.perf_counter()
        print(f"== {s}", flush=True)
        if s == "gaussian":
            done[s], ode_nfe = SECTION_FUNCTIONS[s](a)
        elif s == "samplers":
            done[s] = SECTION_FUNCTIONS[s](a, ode_nfe)
        else:
            done[s] = SECTION_FUNCTIONS[s](a)
        print(f"== {s}: {time.perf_counter() - t0:.1f} s", flush=True)
    stamp = f"_{env['date']}, device {env['device']}{', quick' if a.quick else ''}, commit {env['commit']}._"
    common.write_summary(a.output, BLOCK, TITLES, {s: done[s] for s in SECTIONS if s in done}, header(a, env), stamp,
                         quick=a.quick)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
