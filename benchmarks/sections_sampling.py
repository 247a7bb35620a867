"""The sampling sections of benchmarks/run.py: ``samplers`` (cost per sample and peak memory at
160x160), ``gaussian`` (posterior error vs NFE on the exact Gaussian field) and ``ckpt``
(consistency, PSNR and diversity on a trained checkpoint).

``sampler_setup`` and ``sampler_memory`` are module-level so that a fresh child process
(``common.call_in_subprocess("benchmarks.sections_sampling:sampler_memory", ...)``) can run them.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from benchmarks import common
import torch

from msdiff.guidance import Unguided
from msdiff.samplers import DDIM, EulerMaruyama, Heun, HeunPC, PredictorCorrector, ProbabilityFlowODE
from msdiff.sde import VESDE
from benchmarks.sections_unet import make_estimator, make_net


def full_samplers() -> dict:
    """The samplers of the tables at their full settings: PC(1000) is the paper's reference."""
    return {"PC": PredictorCorrector(1000), "EM": EulerMaruyama(1000), "ODE": ProbabilityFlowODE(),
            "Heun": Heun(50), "DDIM": DDIM(50), "HeunPC": HeunPC()}


def _with_steps(name: str, steps: int):
    """Sampler `name` with `steps` steps (HeunPC: that many Heun and that many PC steps)."""
    if name == "ODE":
        return ProbabilityFlowODE(rtol=1e-2, atol=1e-2)
    return HeunPC(steps, steps) if name == "HeunPC" else type(full_samplers()[name])(steps)


def sampler_setup(quick: bool, name: str, steps: int, device: str = "cpu",
                  threads: int | None = None) -> tuple[Callable[..., int], dict[str, Any]]:
    """A callable that draws one sample (batch 1) with sampler `name` at `steps` steps (ODE: adaptive, a
    run at rtol = atol = 1e-2) and returns its NFE; `run(other_steps)` reuses the same network."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = make_net(quick).to(device).eval()
    size = net.image_size
    est = make_estimator(size)
    y = torch.rand(1, 3, size, size, device=device)

    def run(steps: int = steps) -> int:
        s = _with_steps(name, steps)
        g = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            Unguided().sample(est, net, y, s, 3, generator=g)
        return s.nfe

    return run, {"name": name, "steps": steps}


def sampler_memory(quick: bool, name: str, s1: int, s2: int, device: str = "cpu", threads: int | None = None) -> dict:
    """Peak memory of one sample with s1 steps, then (high-water mark reset) of one with s2 steps."""
    run, _ = sampler_setup(quick, name, s1, device, threads)
    peak1 = common.peak_memory(run, device)["peak_mib"]
    return {"peak1": peak1, "peak2": common.peak_memory(lambda: run(s2), device)["peak_mib"]}


def _ode_nfe_on_gaussian_field() -> int:
    """The probability-flow ODE's NFE (RK45, default tolerances) from one exact-law solve on the VE
    Gaussian field (< 1 s): the NFE the samplers table uses when "gaussian" is not run."""
    from benchmarks import gaussian_samplers as gs
    from msdiff.gaussian import GaussianField, GaussianInverseProblem
    from msdiff.utils import make_generator

    problem = GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), 2, noise_std=0.05)
    ode = ProbabilityFlowODE()
    gs.exact_law(ode, VESDE(0.01, 50.0), problem, problem.sample(4, make_generator(0))[1])
    return ode.nfe


def section_samplers(a: argparse.Namespace, ode_nfe: float | None) -> str:
    """Seconds per sample (cost per NFE x NFE) and peak memory per sampler at its full setting."""
    if ode_nfe is None:
        ode_nfe = _ode_nfe_on_gaussian_field()
    s1, s2 = (1, 3) if a.quick else (1, 2)
    size = 16 if a.quick else 160
    rows = ["| sampler (full setting) | NFE/sample | s per NFE | s per sample | peak MiB after s1 / s2 steps |",
            "|---|---|---|---|---|"]
    names = [n for n in full_samplers() if n != "ODE"]
    mem_kw = [dict(quick=a.quick, name=n, s1=s1, s2=s2, device=a.device, threads=a.threads) for n in full_samplers()]
    quick_mem = [sampler_memory(**kw) for kw in mem_kw] if a.quick else None  # in-process: before the timing
    with ThreadPoolExecutor(3) as pool:  # full run: memory in fresh processes, 3 at a time, BEFORE the timings
        mem = quick_mem or list(pool.map(
            lambda kw: common.call_in_subprocess("benchmarks.sections_sampling:sampler_memory", kw), mem_kw))
    runs = {n: sampler_setup(a.quick, n, s1, a.device)[0] for n in names}  # the timings run alone
    nfe = {n: fn() for n, fn in runs.items()}  # also the warm-up
    t = common.interleaved_times(runs, a.repeats, 0, a.device)
    per_nfe = {n: t[n]["median"] / nfe[n] for n in names}
    mem = dict(zip(full_samplers(), mem))
    labels = {"PC": "PC 1000 steps, 1 corrector", "EM": "EM 1000 steps", "ODE": "ODE RK45 1e-5",
              "Heun": "Heun 50 steps", "DDIM": "DDIM 50 steps, eta 0",
              "HeunPC": "HeunPC 8 Heun + 42 PC steps (LM corrector)"}
    for name, s in full_samplers().items():
        n_full = ode_nfe if name == "ODE" else s.nfe
        cost = per_nfe["EM" if name == "ODE" else name]
        grows = mem[name]["peak2"] > 1.05 * mem[name]["peak1"] + 8
        peaks = f"{mem[name]['peak1']:.0f} / {mem[name]['peak2']:.0f}{' GROWS' if grows else ''}"
        rows.append(f"| {labels[name]} | {n_full} | {cost:.3f} | {cost * n_full:.1f} | {peaks} |")
        print(rows[-1], flush=True)
    return "\n".join([
        f"Randomly initialised U-Net ({'tiny' if a.quick else 'SR-160, 6 -> 6'}), CMDE score, {size}x{size}, batch 1 "
        f"(the weights do not change the cost), {a.threads} torch thread(s). Cost per NFE = time of one sample with "
        f"{s1} step(s) / its NFE, the samplers timed in turn (median of {a.repeats} after a warm-up) so that load "
        "changes hit all alike; seconds per sample = cost per NFE x NFE at the full setting (the network evaluation "
        "is the whole per-step cost at this size). ODE: adaptive steps; NFE of RK45 at 1e-5 on the Gaussian field "
        "(VE), cost per NFE taken from EM (one evaluation per step). Peak memory of one sample with "
        f"{s1} and with {s2} steps (ODE: rtol 1e-2 both times), " + ("in-process (quick)" if a.quick else
        "in a fresh process per sampler, three at a time before the timings") + "; equal figures "
        f"after {s1} and {s2} steps mean memory does not grow with steps.", "", *rows])


def section_gaussian(a: argparse.Namespace) -> tuple[str, float | None]:
    """Posterior error vs NFE on the exact Gaussian field (VE and VP); also returns the ODE's NFE (VE)."""
    from benchmarks import gaussian_samplers as gs

    draws = 50 if a.quick else 2000
    if a.quick:
        st = [PredictorCorrector(20), EulerMaruyama(20), DDIM(10, eta=1.0)]
        det = [DDIM(10), Heun(5), ProbabilityFlowODE(rtol=1e-3, atol=1e-3)]
    else:
        st, det = gs.default_samplers()
    torch.set_num_threads(1)
    try:
        rows = gs.accuracy_rows(draws, st, det)
    finally:
        torch.set_num_threads(a.threads)
    ref_nfe = st[0].nfe
    out = ["| SDE | sampler | NFE | measure | rel. mean err | rel. cov err | W2 | s |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {s} | {lab} | {n} | {how} | {e['mean_error']:.4f} | {e['cov_error']:.4f} | {e['w2']:.4f} | {sec:.1f} |"
            for s, lab, n, how, e, sec in rows]
    verdicts, ode_nfe = [], None
    for sde in ("VE", "VP"):
        ref = next(e for s, lab, n, _, e, _ in rows if s == sde and n == ref_nfe and lab.startswith("PC"))
        ok = [(e["w2"], lab, n, e) for s, lab, n, _, e, _ in rows if s == sde and 0 < n <= 100
              and e["cov_error"] <= ref["cov_error"] and e["w2"] <= ref["w2"]]
        best = min(ok, key=lambda r: r[0]) if ok else None
        verdicts.append(f"- Target ({sde}): a sampler with <= 100 NFE at least as accurate (cov err and W2) as PC with "
                        f"{ref_nfe} NFE (cov {ref['cov_error']:.4f}, W2 {ref['w2']:.4f}): " +
                        (f"{best[1]} ({best[2]} NFE, cov {best[3]['cov_error']:.4f}, W2 {best[0]:.4f}) -> **met**."
                         if best else "none -> **missed**."))
        if sde == "VE":
            ode_nfe = next((n for s, lab, n, _, _, _ in rows if s == "VE" and lab.startswith("ProbabilityFlowODE")), None)
    text = "\n".join([f"`gaussian_samplers.py` problem: 1x4x4 field, 2x SR, noise 0.05, exact posterior score, 4 "
                      f"conditions; stochastic samplers: {draws} draws each (MC); deterministic: exact output law. "
                      "The first row is the Monte-Carlo floor of the stochastic rows.", "", *out, "", *verdicts])
    return text, ode_nfe


def section_ckpt(a: argparse.Namespace) -> str:
    """Consistency PSNR, PSNR and diversity per sampler on a trained checkpoint (``--ckpt``)."""
    if not a.ckpt:
        return ("Not run: pass `--ckpt PATH` (a `train.py --config quickstart.yaml` checkpoint, e.g. "
                "runs/quickstart/checkpoints/last.ckpt). Cost: every sampler draws `--ckpt-images` x `--ckpt-draws` "
                "samples in one batch; PC needs 2,000 network evaluations of that batch, EM 1,000, Heun 99, DDIM 50.")
    from msdiff.metrics import diversity
    from msdiff.run import TrainedRun
    from msdiff.utils import quantize

    trained = TrainedRun.open(a.ckpt)
    system = trained.system().to(a.device)
    ds, task = trained.split("test"), trained.task()
    n, k = (2, 2) if a.quick else (a.ckpt_images, a.ckpt_draws)
    items = [ds[i] for i in range(n)]
    x = torch.stack([it["x"] for it in items]).to(a.device)
    y = torch.stack([it["y"] for it in items]).to(a.device)
    yk = y.repeat(k, 1, 1, 1)
    mask = torch.stack([it["mask"] for it in items]).to(a.device).repeat(k, 1, 1, 1) if "mask" in items[0] else None
    samplers = ({"PC": PredictorCorrector(20), "Heun": Heun(5), "DDIM": DDIM(5), "HeunPC": HeunPC(2, 4)}
                if a.quick else full_samplers())
    rows = ["| sampler | NFE/sample | consistency PSNR dB | PSNR dB vs x | diversity (0-255 std) | s |",
            "|---|---|---|---|---|---|"]
    cons = {}
    for name, s in samplers.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = system.sample(yk, s, generator=torch.Generator(a.device).manual_seed(0))
        sec = time.perf_counter() - t0
        q = quantize(out)
        cons[name] = (float(task.consistency(q, yk, mask=mask).mean()) if task is not None else float("nan"), s.nfe)
        ps = float(-10 * torch.log10((q - x.repeat(k, 1, 1, 1)).square().flatten(1).mean(1).clamp_min(1e-10)).mean())
        div = float(diversity(q.reshape(k, n, *q.shape[1:])).mean())
        rows.append(f"| {name} | {s.nfe} | {cons[name][0]:.2f} | {ps:.2f} | {div:.2f} | {sec:.1f} |")
        print(rows[-1], flush=True)
    ref = cons["PC"][0]
    fast = [(c, nm, nfe) for nm, (c, nfe) in cons.items() if nfe <= 100 and nm != "PC"]
    best = max(fast) if fast else None
    verdict = (f"- Target: a <= 100-NFE sampler within 0.5 dB consistency PSNR of PC ({ref:.2f} dB): {best[1]} "
               f"{best[0]:.2f} dB ({best[0] - ref:+.2f}) -> **{'met' if best[0] >= ref - 0.5 else 'missed'}**."
               if best else "- Target: no <= 100-NFE sampler run.")
    return "\n".join([f"Checkpoint `{a.ckpt}` (EMA weights), {n} test conditions x {k} draws, seed 0; consistency is "
                      "the task's re-degradation PSNR, diversity the per-pixel std over draws (msdiff.metrics).", "",
                      *rows, "", verdict])
