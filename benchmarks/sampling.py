"""Sampling speed and peak memory per sampler at 160x160 with the SR-160 U-Net (Batzolis et al.:
ch 96, ch_mult (1,1,2,2,3,3), attention at 20/10/5; randomly initialised, since speed does not depend
on the weights), CDE estimator on the reference VE SDE, batch 1 and 8.

Method. Every (sampler, batch, steps) runs in a FRESH subprocess, so its peak memory (CUDA:
max_memory_allocated; CPU: the process's peak RSS, ru_maxrss) is its own. Each subprocess first runs
one 1-step call (allocator and kernel warm-up), then the timed call with `steps` steps. With two step
counts s1 < s2 the per-step cost is (t(s2) - t(s1)) / (s2 - s1), which removes fixed costs; the cost of
a full-length run (the sampler's own steps: PC/EM 1000, Heun/DDIM 50 here) is extrapolated linearly from it. Memory that grew
from s1 to s2 steps (more than 5% + 16 MiB) is flagged GROWS. The probability-flow ODE has no step
count: it runs once per batch at its rtol/atol, and its row reports the cost per network evaluation
and samples/s at the NFE the solver used. `--samplers` is a list of `msdiff.samplers` classes (their
own step count is the full length); `--samplers+ CLASS --samplers.KEY V` adds one.

    python -m benchmarks.sampling [--device cuda] [--steps 2 6] [--batch 1 8] [--samplers+ HeunPC]
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from jsonargparse import ArgumentParser

from benchmarks.common import ROOT
from msdiff.guidance import Unguided
from msdiff.checkpoint_file import instantiate_config
from msdiff.estimators import CDE
from msdiff.nn.unet import UNet
from msdiff.samplers import Sampler
from msdiff.sde import VESDE

DEFAULT_SAMPLERS = [
    {"class_path": "msdiff.samplers.PredictorCorrector", "init_args": {"steps": 1000}},
    {"class_path": "msdiff.samplers.EulerMaruyama", "init_args": {"steps": 1000}},
    {"class_path": "msdiff.samplers.ProbabilityFlowODE", "init_args": {"rtol": 1e-2, "atol": 1e-2}},
    {"class_path": "msdiff.samplers.Heun", "init_args": {"steps": 50}},
    {"class_path": "msdiff.samplers.DDIM", "init_args": {"steps": 50}},
]


def with_steps(config: dict, steps: int) -> dict:
    """The sampler config with ``steps`` steps (unchanged for a sampler without a step count)."""
    if "steps" not in config.get("init_args", {}):
        return config
    return {**config, "init_args": {**config["init_args"], "steps": steps}}


def child(config: dict, batch: int, steps: int, device: str, size: int) -> dict:
    """One measurement in this (fresh) process: warm-up, then the timed call."""
    torch.manual_seed(0)
    net = UNet(in_channels=6, out_channels=3, ch=96, ch_mult=(1, 1, 2, 2, 3, 3), num_res_blocks=2,
               attn_resolutions=(size // 8, size // 16, size // 32), image_size=size, dropout=0.0).to(device).eval()
    est = CDE(sde=VESDE(sigma_min=0.005, sigma_max=(3 * size * size) ** 0.5))
    y = torch.rand(batch, 3, size, size, device=device)

    def call(sampler) -> float:
        g = torch.Generator(device=device).manual_seed(0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():  # the library's composition (Guidance.sample), on a random network
            Unguided().sample(est, net, y, sampler, 3, generator=g)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    stepped = "steps" in config.get("init_args", {})
    if stepped:
        call(instantiate_config(with_steps(config, 1), Sampler))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = instantiate_config(with_steps(config, steps), Sampler)
    seconds = call(sampler)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"seconds": seconds, "nfe": sampler.nfe, "peak_mib": peak}


def measure(config: dict, batch: int, steps: int, a) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.sampling", "--child", json.dumps(config), "--child_batch", str(batch),
           "--child_steps", str(steps), "--device", a.device, "--image_size", str(a.image_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(ROOT)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = ArgumentParser(exit_on_error=False)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image_size", type=int, default=160)
    p.add_argument("--steps", type=tuple[int, int], default=(2, 6))
    p.add_argument("--batch", type=list[int], default=[1, 8])
    p.add_argument("--samplers", type=list[Sampler], default=DEFAULT_SAMPLERS)
    p.add_argument("--child", type=str, default=None, help="(internal) one sampler's config as JSON")
    p.add_argument("--child_batch", type=int, default=1)
    p.add_argument("--child_steps", type=int, default=1)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child), a.child_batch, a.child_steps, a.device, a.image_size)))
        return
    mem = "peak CUDA MiB" if a.device == "cuda" else "peak RSS MiB"
    s1, s2 = a.steps
    configs = [sampler.as_dict() for sampler in a.samplers]
    print(f"| sampler | batch | NFE/step | s per step | samples/s at full length | {mem} ({s1} / {s2} steps) |")
    print("|---|---|---|---|---|---|")
    for b in a.batch:
        for config in configs:
            name = config["class_path"].rpartition(".")[2]
            full = config.get("init_args", {}).get("steps")
            if full is None:
                r = measure(config, b, 0, a)
                print(f"| {name} ({r['nfe']} NFE) | {b} | - | {r['seconds'] / r['nfe']:.4f} per NFE | "
                      f"{b / r['seconds']:.4f} | {r['peak_mib']:.0f} |", flush=True)
                continue
            r1, r2 = measure(config, b, s1, a), measure(config, b, s2, a)
            per_step = (r2["seconds"] - r1["seconds"]) / (s2 - s1)
            nfe_step = (r2["nfe"] - r1["nfe"]) / (s2 - s1)
            grows = r2["peak_mib"] > 1.05 * r1["peak_mib"] + 16
            print(f"| {name} ({full} steps) | {b} | {nfe_step:.0f} | {per_step:.3f} | "
                  f"{b / (per_step * full):.5f} | {r1['peak_mib']:.0f} / {r2['peak_mib']:.0f}"
                  f"{' GROWS' if grows else ''} |", flush=True)


if __name__ == "__main__":
    main()
