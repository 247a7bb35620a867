"""SR-160 U-Net training-step benchmark (issue 3 "Performance", issue 9 memory target).

Measures, for the default UNet (6 -> 6 channels, 160x160) at batch 1 and 4:
- the training step (forward + backward + Adam): median seconds over repeats after warm-up,
  images/s, FLOPs counted by torch.utils.flop_counter.FlopCounterMode, the achieved FLOP/s and
  its ratio to a large fp32 matmul's FLOP/s measured in the same process (interleaved);
- peak resident memory of one training step in a fresh subprocess per configuration (plain and
  with activation checkpointing), sampled from /proc/self/statm every 2 ms during the step;
- fused SDPA vs naive softmax(q k^T / sqrt(d)) v (the processors alone, forward and
  forward + backward) at every attention resolution the SR-160, inpainting-128 and edges-64
  configurations use.

Usage: .venv/bin/python -m benchmarks.unet_step [--repeats 3] [--batches 1 4] [--threads N]
       [--channels-last] [--skip-speed] [--skip-memory] [--skip-attention]
Prints markdown tables. Runs, like train.py, with the glibc malloc settings of msdiff/malloc.py
(re-executes itself once; MSDIFF_SYSTEM_MALLOC=1 keeps the system defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


if __name__ == "__main__":  # before torch is imported: measure with train.py's allocator (msdiff/malloc.py)
    from msdiff.malloc import use_caching_malloc

    use_caching_malloc()

import torch

from benchmarks import common  # the shared matmul reference

from msdiff.nn.attention import NaiveProcessor, SDPAProcessor
from msdiff.nn.unet import UNet


def timed(fn, repeats: int, warmup: int = 0) -> list[float]:
    """Wall seconds of each of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    return wall


def make_step(net: UNet, batch: int, channels_last: bool = False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)  # as ScoreSystem
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=gen).to(memory_format=fmt)
    target = torch.randn(batch, net.out_channels, net.image_size, net.image_size, generator=gen).to(memory_format=fmt)
    label = torch.rand(batch, generator=gen) * 999

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (net(x, label) - target).square().mean()
        loss.backward()
        opt.step()

    def fwd_bwd() -> None:
        (net(x, label) - target).square().mean().backward()

    return step, fwd_bwd


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def speed_table(batches: list[int], repeats: int, channels_last: bool) -> str:
    rows = ["| batch | step s (median) | images/s | GFLOP/step | GFLOP/s | matmul GFLOP/s | ratio |",
            "|---|---|---|---|---|---|---|"]
    for batch in batches:
        torch.manual_seed(0)
        net = UNet()
        step, fwd_bwd = make_step(net, batch, channels_last)
        flops = count_flops(fwd_bwd)
        net.zero_grad(set_to_none=True)
        step()                                                  # warm-up (allocates Adam's state)
        mm_before = common.matmul_flops()
        wall = timed(step, repeats)
        mm_after = common.matmul_flops()
        sec = statistics.median(wall)
        mm = statistics.median([mm_before, mm_after])
        rows.append(f"| {batch} | {sec:.3f} | {batch / sec:.3f} | {flops / 1e9:.1f} | {flops / sec / 1e9:.1f} "
                    f"| {mm / 1e9:.1f} | {flops / sec / mm:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(batch: int, checkpointing: bool, threads: int) -> None:
    """One training step in this fresh process; a thread samples the resident set every 2 ms."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = UNet(checkpointing=checkpointing)
    step, _ = make_step(net, batch)
    base = rss_mb()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()                      # the first step also allocates the gradients and Adam's state
    done.set()
    sampler.join()
    print(json.dumps({"base_mb": base, "peak_mb": max(peak[0], rss_mb())}))


def memory_table(batches: list[int]) -> str:
    rows = ["| batch | checkpointing | peak RSS in step MB | RSS before step MB | step increase MB |",
            "|---|---|---|---|---|"]
    ratios = []
    for batch in batches:
        res = {}
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(batch), str(int(ckpt)),
                                  str(torch.get_num_threads())],
                                 check=True, capture_output=True, text=True).stdout
            res[ckpt] = json.loads(out.strip().splitlines()[-1])
            r = res[ckpt]
            rows.append(f"| {batch} | {ckpt} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
                        f"{r['peak_mb'] - r['base_mb']:.0f} |")
            print(rows[-1], flush=True)
        ratios.append(f"batch {batch}: checkpointed/plain peak = {res[True]['peak_mb'] / res[False]['peak_mb']:.2f}, "
                      f"step increase ratio = {(res[True]['peak_mb'] - res[True]['base_mb']) / (res[False]['peak_mb'] - res[False]['base_mb']):.2f}")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {r}" for r in ratios)


# (config, resolution, channels) of every attention layer kind in the three configurations
ATTENTION_SHAPES = [("SR-160", 20, 192), ("SR-160", 10, 288), ("SR-160", 5, 288),
                    ("inpaint-128", 16, 192), ("inpaint-128", 8, 288), ("inpaint-128", 4, 288),
                    ("edges-64", 16, 256), ("edges-64", 8, 256)]


def paired_ms(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median ms of fn_a and fn_b timed alternately (both see the same load), and the median of
    the per-pair ratios b/a."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        ta += timed(fn_a, 1)
        tb += timed(fn_b, 1)
    return 1e3 * statistics.median(ta), 1e3 * statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


def attention_table(batch: int, repeats: int) -> str:
    """Times the attention itself (q, k, v -> out, single head as the reference) per processor."""
    rows = ["| config | res | tokens | ch | fwd SDPA ms | fwd naive ms | naive/SDPA | fwd+bwd SDPA ms "
            "| fwd+bwd naive ms | naive/SDPA |", "|---|---|---|---|---|---|---|---|---|---|"]
    sdpa, naive = SDPAProcessor(), NaiveProcessor()
    for name, res, ch in ATTENTION_SHAPES:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, 1, res * res, ch, generator=gen).requires_grad_() for _ in range(3))
        grid = (res, res)
        with torch.no_grad():
            fwd = paired_ms(lambda: sdpa(q, k, v, grid), lambda: naive(q, k, v, grid), repeats * 10)
        bwd = paired_ms(lambda: sdpa(q, k, v, grid).sum().backward(),
                        lambda: naive(q, k, v, grid).sum().backward(), repeats * 10)
        rows.append(f"| {name} | {res} | {res * res} | {ch} | {fwd[0]:.3f} | {fwd[1]:.3f} | {fwd[2]:.2f} "
                    f"| {bwd[0]:.3f} | {bwd[1]:.3f} | {bwd[2]:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--attention-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--channels-last", action="store_true", help="speed table in channels-last layout")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--memory-child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child[0], bool(args.memory_child[1]), args.memory_child[2])
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, channels_last={args.channels_last}\n")
    if not args.skip_speed:
        print("### Training step, SR-160 UNet (6 -> 6), fp32\n")
        print(speed_table(args.batches, args.repeats, args.channels_last) + "\n")
    if not args.skip_memory:
        print("### Peak memory of one training step (fresh process each)\n")
        print(memory_table(args.batches) + "\n")
    if not args.skip_attention:
        print(f"### Fused SDPA vs naive attention (processor only, batch {args.attention_batch})\n")
        print(attention_table(args.attention_batch, args.repeats) + "\n")


if __name__ == "__main__":
    main()
