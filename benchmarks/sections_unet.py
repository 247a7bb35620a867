"""The U-Net sections of benchmarks/run.py: ``unet`` (SR-160 training step and forward: time, FLOP/s,
peak memory, activation checkpointing) and ``attention`` (fused SDPA vs naive attention).

``make_net``, ``make_estimator`` and ``unet_setup`` are module-level so that a fresh child process
(``common.peak_memory_in_subprocess("benchmarks.sections_unet:unet_setup", ...)``) can build the same model.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable

from benchmarks import common
import torch

from msdiff.estimators import CMDE
from msdiff.nn.unet import UNet
from msdiff.sde import VESDE, MultiSpeedSDE
from msdiff.systems.ema import EMA

# (mode, batch, checkpointing) of one U-Net memory measurement
Config = tuple[str, int, bool]


# ---- models (module-level: fresh child processes build them from these) ----------------------------
def make_net(quick: bool, checkpointing: bool = False) -> UNet:
    """The SR-160 U-Net (or, ``quick``, a tiny 16x16 one) with 6 input and 6 output channels."""
    if quick:
        return UNet(in_channels=6, out_channels=6, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                    image_size=16, dropout=0.1, checkpointing=checkpointing)
    return UNet(checkpointing=checkpointing)  # the SR-160 configuration of sr8x_cmde.yaml, 43,481,862 parameters


def make_estimator(size: int) -> CMDE:
    """CMDE with the SR-160 sigmas (sigma_max_x = sqrt(3 H W), sigma_max_y = 0.5)."""
    return CMDE(sde=MultiSpeedSDE(VESDE(0.005, math.sqrt(3 * size * size)), VESDE(0.005, 0.5)))


def unet_setup(quick: bool, batch: int, checkpointing: bool = False, mode: str = "train", device: str = "cpu",
               count: bool = True) -> tuple[Callable[[], None], dict[str, Any]]:
    """A zero-argument callable: one training step (CMDE loss, backward, fused Adam as ``ScoreSystem``
    configures it, EMA update) or one no-grad forward; info holds the FLOPs of forward (+ backward)
    counted once by FlopCounterMode (``count``; off for memory measurements, so that nothing has run
    before the measured call)."""
    torch.manual_seed(0)
    net = make_net(quick, checkpointing).to(device)
    size = net.image_size
    est = make_estimator(size)
    g = torch.Generator(device).manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g, device=device)
    y = torch.rand(batch, 3, size, size, generator=g, device=device)
    if mode == "forward":
        net.eval()
        inp = torch.randn(batch, 6, size, size, generator=g, device=device)
        label = torch.rand(batch, generator=g, device=device)

        @torch.no_grad()
        def forward() -> None:
            net(inp, label)

        return forward, {"flops": common.count_flops(forward) if count else None}
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)  # as msdiff/systems/score.py
    ema = EMA(net, 0.999)

    def loss() -> torch.Tensor:
        return est.loss(net, x, y, generator=torch.Generator(device).manual_seed(1)).mean()

    flops = common.count_flops(lambda: loss().backward()) if count else None
    net.zero_grad(set_to_none=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        ema.update(net)

    return step, {"flops": flops}


# ---- measurements ------------------------------------------------------------------------------------
def unet_memory(kwargs: dict, fresh: bool, device: str, fn: Callable[[], None] | None = None) -> dict:
    """Peak memory of one `unet_setup(**kwargs)` call: in a fresh process, or in this one (`fn` if given)."""
    if fresh:
        return common.peak_memory_in_subprocess("benchmarks.sections_unet:unet_setup",
                                                {**kwargs, "device": device, "count": False}, device,
                                                system_malloc=True)
    return common.peak_memory(fn or unet_setup(**kwargs, device=device)[0], device)


def time_against_matmul(fn: Callable[[], None], flops: float, repeats: int, n_mm: int,
                        device: str) -> dict[str, float]:
    """Time ``fn`` (``flops`` FLOPs per call) against the machine's current matmul speed.

    One warm-up call, then ``repeats`` rounds of: an n_mm x n_mm fp32 matmul's FLOP/s
    (``common.matmul_flops``), then one timed call. Returns the medians of the call time ("sec") and
    of the matmul FLOP/s ("matmul"), and "fraction": the median over rounds of
    flops / call time / matmul FLOP/s of the same round, so that each call is compared with the
    hardware speed measured just before it (a shared CPU's speed drifts within minutes).
    """
    fn()
    common.sync(device)
    secs, mms, fractions = [], [], []
    for _ in range(max(1, repeats)):
        mm = common.matmul_flops(n_mm, device=device)
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        sec = time.perf_counter() - t0
        secs.append(sec)
        mms.append(mm)
        fractions.append(flops / sec / mm)
    return {"sec": statistics.median(secs), "matmul": statistics.median(mms),
            "fraction": statistics.median(fractions)}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


# ---- sections --------------------------------------------------------------------------------------
def section_unet(a: argparse.Namespace) -> str:
    """Training step and forward of the U-Net: time, FLOP/s vs matmul, peak memory, checkpointing."""
    batches = (1, 2) if a.quick else (1, 4)
    timed = batches if a.quick else tuple(a.unet_batches)
    n_mm = 512 if a.quick else 2048
    rows = ["| mode | batch | s (median) | images/s | GFLOP | GFLOP/s | matmul GFLOP/s | fraction | peak MiB | "
            "increase MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    configs: list[Config] = ([(mode, b, False) for mode in ("train", "forward") for b in batches]
                             + [("train", b, True) for b in batches])
    with ThreadPoolExecutor(3) as pool:  # full run: memory in fresh processes, three at a time
        pending: dict[Config, Future] = {
            c: pool.submit(unet_memory, dict(quick=a.quick, batch=c[1], mode=c[0], checkpointing=c[2]),
                           not a.quick, a.device) for c in configs if not a.quick}
        if not a.overlap:
            wait(pending.values())  # memory first, so that the timings below run alone
        mem: dict = {}
        frac: dict[tuple[str, int], float] = {}
        for mode in ("train", "forward"):
            for b in batches:
                t = "not timed | | | | |"
                if b in timed:
                    fn, info = unet_setup(a.quick, b, mode=mode, device=a.device)
                    r = time_against_matmul(fn, info["flops"], a.repeats, n_mm, a.device)
                    if a.quick:
                        mem[mode, b, False] = unet_memory({}, False, a.device, fn)
                    del fn
                    frac[mode, b] = r["fraction"]
                    sec = r["sec"]
                    t = (f"{sec:.3f} | {b / sec:.3g} | {info['flops'] / 1e9:.1f} | {info['flops'] / sec / 1e9:.1f} | "
                         f"{r['matmul'] / 1e9:.1f} | {r['fraction']:.2f}")
                m = mem.get((mode, b, False)) or pending[mode, b, False].result()
                mem[mode, b, False] = m
                rows.append(f"| {mode} | {b} | {t} | {m['peak_mib']:.0f} | {m['increase_mib']:.0f} |")
                print(rows[-1], flush=True)
        for b in batches:
            mem["train", b, True] = (unet_memory(dict(quick=a.quick, batch=b, checkpointing=True), False, a.device)
                                     if a.quick else pending["train", b, True].result())
    ck = ["| batch | plain peak MiB | checkpointed peak MiB | ratio (peak) | ratio (increase over start) |",
          "|---|---|---|---|---|"]
    for b in batches:
        m = mem["train", b, True]
        p = mem["train", b, False]
        mem["ckpt", b] = m["peak_mib"] / p["peak_mib"]
        ck.append(f"| {b} | {p['peak_mib']:.0f} | {m['peak_mib']:.0f} | {m['peak_mib'] / p['peak_mib']:.2f} | "
                  f"{_ratio(m['increase_mib'], p['increase_mib'])} |")
        print(ck[-1], flush=True)
    b_hi = batches[-1]
    where = ("in this process (quick)" if a.quick else "in a fresh process, three at a time"
             + (", while this one times" if a.overlap else ", before the timings")
             + ", with glibc's default malloc settings (the memory the step needs; the caching settings "
               "of msdiff/malloc.py that train.py uses keep freed blocks, so its peak RSS is higher)")
    kind = ("CUDA max_memory_allocated" if a.device != "cpu"
            else "peak RSS; the increase is over the RSS just before the call")
    return "\n".join([
        "Training step = CMDE loss + backward + Adam (fused, as `ScoreSystem`) + EMA update; forward = one no-grad "
        "U-Net call. FLOPs are forward (+ backward) as counted by `torch.utils.flop_counter` (Adam/EMA element-wise "
        f"work not counted). After one warm-up call, each of {a.repeats} timed calls follows a {n_mm}x{n_mm} fp32 "
        "matmul measured in the same process: s and matmul GFLOP/s are the medians, GFLOP/s = GFLOP / median s, and "
        "fraction = the median over the calls of (FLOPs / that call's time) / the FLOP/s of the matmul just before "
        f"it (the shared CPU's speed drifts). Peak memory of one call {where} ({kind}).", "", *rows, "",
        "Activation checkpointing (`UNet(checkpointing=True)`), training step:", "", *ck, "",
        f"- Target: training step at batch 1 >= 0.75 of matmul FLOP/s: measured {frac['train', 1]:.2f} -> "
        f"**{'met' if frac['train', 1] >= 0.75 else 'missed'}**." if ("train", 1) in frac else
        "- Target: training step at batch 1 >= 0.75 of matmul FLOP/s: not timed in this run.",
        f"- Target: checkpointing trains batch {b_hi} in <= 60% of the memory: measured {mem['ckpt', b_hi]:.2f} of the "
        f"peak -> **{'met' if mem['ckpt', b_hi] <= 0.6 else 'missed'}**."])


def section_attention(a: argparse.Namespace) -> str:
    """Fused SDPA vs naive attention, forward and forward + backward, at every configured shape."""
    from benchmarks.unet_step import ATTENTION_SHAPES
    from msdiff.nn.attention import NaiveProcessor, SDPAProcessor, SelfAttention

    shapes = ATTENTION_SHAPES[:2] if a.quick else ATTENTION_SHAPES
    batch = 1 if a.quick else 4
    rows = ["| config | res | ch | fwd SDPA ms | fwd naive ms | naive/SDPA | fwd+bwd SDPA ms | fwd+bwd naive ms | "
            "naive/SDPA |", "|---|---|---|---|---|---|---|---|---|"]
    worst = math.inf
    reps = 10 * a.repeats
    for name, res, ch in shapes:
        torch.manual_seed(0)
        attn = SelfAttention(ch).to(a.device)
        x = torch.randn(batch, ch, res, res, device=a.device, requires_grad=True)
        procs = {"sdpa": SDPAProcessor(), "naive": NaiveProcessor()}

        def call(label: str, backward: bool) -> Callable[[], None]:
            def fn() -> None:
                attn.processor = procs[label]
                if backward:
                    attn(x).sum().backward()
                else:
                    with torch.no_grad():
                        attn(x)
            return fn

        r = {}
        for mode in ("f", "b"):
            t = common.interleaved_times({"sdpa": call("sdpa", mode == "b"), "naive": call("naive", mode == "b")},
                                         reps, 3, a.device)
            r[mode] = (1e3 * t["sdpa"]["median"], 1e3 * t["naive"]["median"], t["naive"]["min"] / t["sdpa"]["min"])
        worst = min(worst, r["f"][2], r["b"][2])
        rows.append(f"| {name} | {res} | {ch} | {r['f'][0]:.3f} | {r['f'][1]:.3f} | {r['f'][2]:.2f} | "
                    f"{r['b'][0]:.3f} | {r['b'][1]:.3f} | {r['b'][2]:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join([f"`SelfAttention` module, batch {batch}; SDPA and naive calls interleaved, {reps} each after 3 "
                      "warm-ups; ms columns are medians, naive/SDPA is the ratio of the minima (the calls least "
                      "disturbed by other jobs). Shapes from `unet_step.ATTENTION_SHAPES` (every attention layer the "
                      "configs use).", "", *rows, "",
                      f"- Target: fused never slower than naive: smallest naive/SDPA ratio {worst:.2f} -> "
                      f"**{'met' if worst >= 1.0 else 'missed'}**" + (" (within 5% timing noise)" if 0.95 <= worst < 1.0 else "")
                      + "."])
