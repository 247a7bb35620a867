"""One benchmark command (issue 9): measure speed, memory and sampling accuracy and rewrite the
generated summary at the top of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run.py [--quick] [--device cpu|cuda] [--ckpt PATH] [--only SECTION ...]
                                       [--repeats N] [--threads N] [--unet-batches 1 4] [--output PATH]

Sections (``--only`` runs a subset and rewrites only those; the others keep their last results):
  unet       SR-160 U-Net (6 -> 6, CMDE loss): training step (forward + backward + Adam + EMA) and
             no-grad forward at batch 1 and 4: median seconds, images/s, peak memory (fresh process
             per configuration), FLOPs (torch.utils.flop_counter) and achieved FLOP/s as a fraction of
             a dense fp32 matmul measured in the same process; activation checkpointing memory.
  attention  fused SDPA vs naive attention at every attention shape the configs use.
  data       decoded + degraded examples/s per worker (one process, one thread) per dataset.
  samplers   per sampler at 160x160, batch 1: NFE per sample, seconds per sample = cost per NFE (one
             sample with 1 step / its NFE, samplers timed in turn) x NFE, peak memory of one sample
             with 1 and with 2 steps (equal when memory does not grow with steps).
  gaussian   posterior error vs NFE on the exact Gaussian field, VE and VP (gaussian_samplers.py).
  ckpt       with --ckpt: consistency PSNR, PSNR and diversity per sampler on a trained checkpoint.
  cut        CUT and FastCUT seconds/iteration and peak memory at 256x256 (from cut_step.py).

``--quick`` shrinks every size (tiny U-Net, 16x16 sampling, few draws, 32x32 CUT) and measures memory
in-process, to check that the command works; its figures mean nothing. Timings on a shared machine
are noisy: quote ratios measured within one run. On a CPU shared by other jobs, ``--threads 1``
avoids the oversubscription that makes multi-threaded convolutions stall.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor, wait
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

from msdiff.estimators import CMDE  # noqa: E402
from msdiff.nn.unet import UNet  # noqa: E402
from msdiff.samplers import DDIM, EulerMaruyama, Heun, PredictorCorrector, ProbabilityFlowODE  # noqa: E402
from msdiff.sde import VESDE, MultiSpeedSDE  # noqa: E402
from msdiff.systems.ema import EMA  # noqa: E402

BLOCK = "benchmarks/run.py"
SECTIONS = ("unet", "attention", "data", "samplers", "gaussian", "ckpt", "cut")
TITLES = {"unet": "U-Net SR-160 training step and forward", "attention": "Fused vs naive attention",
          "data": "Data pipeline (per worker)", "samplers": "Samplers at 160x160: cost",
          "gaussian": "Samplers on the Gaussian field: accuracy vs NFE",
          "ckpt": "Samplers on a trained checkpoint: consistency and diversity",
          "cut": "CUT and FastCUT at 256x256"}


# ---- models (module-level: fresh child processes build them from these) ----------------------------
def make_net(quick: bool, checkpointing: bool = False) -> UNet:
    if quick:
        return UNet(in_channels=6, out_channels=6, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                    image_size=16, dropout=0.1, checkpointing=checkpointing)
    return UNet(checkpointing=checkpointing)  # the SR-160 configuration of sr8x_cmde.yaml, 43,481,862 parameters


def make_estimator(size: int) -> CMDE:
    """CMDE with the SR-160 sigmas (sigma_max_x = sqrt(3 H W), sigma_max_y = 0.5)."""
    return CMDE(sde=MultiSpeedSDE(VESDE(0.005, math.sqrt(3 * size * size)), VESDE(0.005, 0.5)))


def unet_setup(quick: bool, batch: int, checkpointing: bool = False, mode: str = "train", device: str = "cpu",
               count: bool = True):
    """A zero-argument callable: one training step (CMDE loss, backward, Adam, EMA update) or one no-grad
    forward; info holds the FLOPs of forward (+ backward) counted once by FlopCounterMode (``count``; off
    for memory measurements, so that nothing has run before the measured call)."""
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
        def fn():
            net(inp, label)

        return fn, {"flops": common.count_flops(fn) if count else None}
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    ema = EMA(net, 0.999)

    def loss():
        return est.loss(net, x, y, generator=torch.Generator(device).manual_seed(1)).mean()

    flops = common.count_flops(lambda: loss().backward()) if count else None
    net.zero_grad(set_to_none=True)

    def fn():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        ema.update(net)

    return fn, {"flops": flops}


def _memory(kwargs: dict, fresh: bool, device: str, fn=None) -> dict:
    """Peak memory of one `unet_setup(**kwargs)` call: in a fresh process, or in this one (`fn` if given)."""
    if fresh:
        return common.peak_memory_in_subprocess("run:unet_setup", {**kwargs, "device": device, "count": False}, device)
    return common.peak_memory(fn or unet_setup(**kwargs, device=device)[0], device)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def section_unet(a) -> str:
    batches = (1, 2) if a.quick else (1, 4)
    timed = batches if a.quick else tuple(a.unet_batches)
    n_mm = 512 if a.quick else 2048
    rows = ["| mode | batch | s (median) | images/s | GFLOP | GFLOP/s | matmul GFLOP/s | fraction | peak MiB | "
            "increase MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    configs = [(mode, b, False) for mode in ("train", "forward") for b in batches] + [("train", b, True) for b in batches]
    with ThreadPoolExecutor(3) as pool:  # full run: memory in fresh processes, three at a time
        pending = {c: pool.submit(_memory, dict(quick=a.quick, batch=c[1], mode=c[0], checkpointing=c[2]),
                                  not a.quick, a.device) for c in configs if not a.quick}
        if not a.overlap:
            wait(pending.values())  # memory first, so that the timings below run alone
        mem, frac = {}, {}
        for mode in ("train", "forward"):
            for b in batches:
                sec = info = mm = None
                if b in timed:
                    fn, info = unet_setup(a.quick, b, mode=mode, device=a.device)
                    mm0 = common.matmul_flops(n_mm, device=a.device)
                    sec = common.median_time(fn, a.repeats, warmup=1, device=a.device)
                    mm = (mm0 + common.matmul_flops(n_mm, device=a.device)) / 2
                    if a.quick:
                        mem[mode, b, False] = _memory({}, False, a.device, fn)
                    del fn
                    frac[mode, b] = info["flops"] / sec / mm
                m = mem.get((mode, b, False)) or pending[mode, b, False].result()
                mem[mode, b, False] = m
                t = (f"{sec:.3f} | {b / sec:.3g} | {info['flops'] / 1e9:.1f} | {info['flops'] / sec / 1e9:.1f} | "
                     f"{mm / 1e9:.1f} | {frac[mode, b]:.2f}") if sec else "not timed | | | | |"
                rows.append(f"| {mode} | {b} | {t} | {m['peak_mib']:.0f} | {m['increase_mib']:.0f} |")
                print(rows[-1], flush=True)
        for b in batches:
            mem["train", b, True] = (_memory(dict(quick=a.quick, batch=b, checkpointing=True), False, a.device)
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
    return "\n".join([
        "Training step = CMDE loss + backward + Adam + EMA update; forward = one no-grad U-Net call. FLOPs are "
        "forward (+ backward) as counted by `torch.utils.flop_counter` (Adam/EMA element-wise work not counted). "
        f"Fraction = achieved FLOP/s / a {n_mm}x{n_mm} fp32 matmul's FLOP/s measured just before and after in the "
        "same process. Peak memory of one call " + ("in this process (quick)" if a.quick else "in a fresh process, three at a time" +
        (", while this one times" if a.overlap else ", before the timings")) + " ("
        + ("CUDA max_memory_allocated" if a.device != "cpu" else "peak RSS; the increase is over the RSS just before "
           "the call") + ").", "", *rows, "",
        "Activation checkpointing (`UNet(checkpointing=True)`), training step:", "", *ck, "",
        f"- Target: training step at batch 1 >= 0.75 of matmul FLOP/s: measured {frac['train', 1]:.2f} -> "
        f"**{'met' if frac['train', 1] >= 0.75 else 'missed'}**." if ("train", 1) in frac else
        "- Target: training step at batch 1 >= 0.75 of matmul FLOP/s: not timed in this run.",
        f"- Target: checkpointing trains batch {b_hi} in <= 60% of the memory: measured {mem['ckpt', b_hi]:.2f} of the "
        f"peak -> **{'met' if mem['ckpt', b_hi] <= 0.6 else 'missed'}**."])


def section_attention(a) -> str:
    from unet_step import ATTENTION_SHAPES
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

        def call(label, backward):
            def fn():
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


def section_data(a) -> str:
    import data_pipeline as dp

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


def full_samplers() -> dict:
    """The samplers of the tables at their full settings: PC(1000) is the paper's reference."""
    return {"PC": PredictorCorrector(1000), "EM": EulerMaruyama(1000), "ODE": ProbabilityFlowODE(),
            "Heun": Heun(50), "DDIM": DDIM(50)}


def sampler_setup(quick: bool, name: str, steps: int, device: str = "cpu", threads: int | None = None):
    """A callable that draws one sample (batch 1) with sampler `name` at `steps` steps (ODE: adaptive, a
    run at rtol = atol = 1e-2) and returns its NFE; `run(other_steps)` reuses the same network."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = make_net(quick).to(device).eval()
    size = net.image_size
    est = make_estimator(size)
    y = torch.rand(1, 3, size, size, device=device)
    sde = est.sampling_sde

    def run(steps: int = steps):
        s = ProbabilityFlowODE(rtol=1e-2, atol=1e-2) if name == "ODE" else type(full_samplers()[name])(steps)
        g = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            s(est.score_fn(net, y, generator=g), sde, sde.prior_sampling((1, 3, size, size), generator=g, device=device), g)
        return s.nfe

    return run, {"name": name, "steps": steps}


def sampler_memory(quick: bool, name: str, s1: int, s2: int, device: str = "cpu", threads: int | None = None) -> dict:
    """Peak memory of one sample with s1 steps, then (high-water mark reset) of one with s2 steps."""
    run, _ = sampler_setup(quick, name, s1, device, threads)
    peak1 = common.peak_memory(run, device)["peak_mib"]
    return {"peak1": peak1, "peak2": common.peak_memory(lambda: run(s2), device)["peak_mib"]}


def section_samplers(a, ode_nfe: float | None) -> str:
    if ode_nfe is None:  # "gaussian" not run: the ODE's NFE from one exact-law solve on the VE field (< 1 s)
        import gaussian_samplers as gs
        from msdiff.gaussian import GaussianField, GaussianInverseProblem
        from msdiff.utils import make_generator

        problem = GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), 2, noise_std=0.05)
        ode = ProbabilityFlowODE()
        gs.exact_law(ode, VESDE(0.01, 50.0), problem, problem.sample(4, make_generator(0))[1])
        ode_nfe = ode.nfe
    s1, s2 = (1, 3) if a.quick else (1, 2)
    size = 16 if a.quick else 160
    rows = ["| sampler (full setting) | NFE/sample | s per NFE | s per sample | peak MiB after s1 / s2 steps |",
            "|---|---|---|---|---|"]
    names = [n for n in full_samplers() if n != "ODE"]
    mem_kw = [dict(quick=a.quick, name=n, s1=s1, s2=s2, device=a.device, threads=a.threads) for n in full_samplers()]
    quick_mem = [sampler_memory(**kw) for kw in mem_kw] if a.quick else None  # in-process: before the timing
    with ThreadPoolExecutor(3) as pool:  # full run: memory in fresh processes, 3 at a time, BEFORE the timings
        mem = quick_mem or list(pool.map(lambda kw: common.call_in_subprocess("run:sampler_memory", kw), mem_kw))
    runs = {n: sampler_setup(a.quick, n, s1, a.device)[0] for n in names}  # the timings run alone
    nfe = {n: fn() for n, fn in runs.items()}  # also the warm-up
    t = common.interleaved_times(runs, a.repeats, 0, a.device)
    per_nfe = {n: t[n]["median"] / nfe[n] for n in names}
    mem = dict(zip(full_samplers(), mem))
    for name, s in full_samplers().items():
        n_full = ode_nfe if name == "ODE" else s.nfe
        cost = per_nfe["EM" if name == "ODE" else name]
        grows = mem[name]["peak2"] > 1.05 * mem[name]["peak1"] + 8
        peaks = f"{mem[name]['peak1']:.0f} / {mem[name]['peak2']:.0f}{' GROWS' if grows else ''}"
        label = {"PC": "PC 1000 steps, 1 corrector", "EM": "EM 1000 steps", "ODE": "ODE RK45 1e-5",
                 "Heun": "Heun 50 steps", "DDIM": "DDIM 50 steps, eta 0"}[name]
        rows.append(f"| {label} | {n_full} | {cost:.3f} | {cost * n_full:.1f} | {peaks} |")
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


def section_gaussian(a) -> tuple[str, float | None]:
    import gaussian_samplers as gs

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


def section_ckpt(a) -> str:
    if not a.ckpt:
        return ("Not run: pass `--ckpt PATH` (a `train.py --config quickstart.yaml` checkpoint, e.g. "
                "runs/quickstart/checkpoints/last.ckpt). Cost: every sampler draws `--ckpt-images` x `--ckpt-draws` "
                "samples in one batch; PC needs 2,000 network evaluations of that batch, EM 1,000, Heun 99, DDIM 50.")
    import lightning.pytorch as pl

    from msdiff.metrics import diversity
    from msdiff.systems.score import instantiate_config, load_data_config, load_score_system
    from msdiff.utils import quantize

    system = load_score_system(a.ckpt, map_location=a.device)
    dm = instantiate_config(load_data_config(a.ckpt), pl.LightningDataModule)
    ds, task = dm.split("test"), dm.task
    n, k = (2, 2) if a.quick else (a.ckpt_images, a.ckpt_draws)
    items = [ds[i] for i in range(n)]
    x = torch.stack([it["x"] for it in items]).to(a.device)
    y = torch.stack([it["y"] for it in items]).to(a.device)
    yk = y.repeat(k, 1, 1, 1)
    mask = torch.stack([it["mask"] for it in items]).to(a.device).repeat(k, 1, 1, 1) if "mask" in items[0] else None
    samplers = ({"PC": PredictorCorrector(20), "Heun": Heun(5), "DDIM": DDIM(5)} if a.quick else full_samplers())
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


def section_cut(a) -> str:
    path = Path(__file__).with_name("cut_step.py")
    if not path.exists():
        return "Skipped: benchmarks/cut_step.py is not present."
    size, iters = (32, 1) if a.quick else (256, a.repeats)
    rows = ["| variant | s / iteration | peak MiB |", "|---|---|---|"]
    res = {}
    for name in ("CUT", "FastCUT"):
        if a.quick:
            import cut_step
            r = cut_step.run_one(name, iters, size, a.device)
        else:
            r = common.call_in_subprocess("cut_step:run_one", dict(name=name, iters=iters, size=size, device=a.device))
        res[name] = r
        rows.append(f"| {name} | {r['s_per_iter']:.3f} | {r['peak_mib']:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join([f"`cut_step.run_one`: one D step + one G/F step of `CUTSystem.training_step`, batch 1, "
                      f"{size}x{size}, median of {iters} after a warm-up; " + ("in-process (quick)" if a.quick else
                      "one fresh process per variant") + " (CPU: peak RSS of that process).", "", *rows, "",
                      f"FastCUT / CUT time: x{res['FastCUT']['s_per_iter'] / res['CUT']['s_per_iter']:.2f}."])


# ---- RESULTS.md --------------------------------------------------------------------------------------
def header(a, env: dict) -> str:
    cmd = " ".join(["python benchmarks/run.py", *sys.argv[1:]])
    env_line = "; ".join(f"{k} {v}" for k, v in env.items())
    return "\n".join([
        "## Summary (benchmarks/run.py)", "",
        "Generated by `python benchmarks/run.py [--quick] [--device cpu|cuda] [--ckpt PATH] [--only SECTION ...]`; "
        "everything between the BEGIN/END markers of this block is rewritten, the rest of the file is left alone. "
        "Each subsection says when and how it was measured. The CPU is shared by other jobs: absolute times are "
        "pessimistic, ratios within one run are the figures to keep.", "",
        f"Last run: `{cmd}`; {env_line}."])


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
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    a = p.parse_args()
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
    todo = [s for s in SECTIONS if a.only is None or s in a.only]
    done: dict[str, str] = {}
    ode_nfe = None
    for s in sorted(todo, key=lambda s: s != "gaussian"):  # gaussian first: the ODE's NFE feeds "samplers"
        t0 = time.perf_counter()
        print(f"== {s}", flush=True)
        if s == "gaussian":
            done[s], ode_nfe = section_gaussian(a)
        elif s == "samplers":
            done[s] = section_samplers(a, ode_nfe)
        else:
            done[s] = globals()[f"section_{s}"](a)
        print(f"== {s}: {time.perf_counter() - t0:.1f} s", flush=True)
    stamp = f"_{env['date']}, device {env['device']}{', quick' if a.quick else ''}, commit {env['commit']}._"
    common.write_summary(a.output, BLOCK, TITLES, {s: done[s] for s in SECTIONS if s in done}, header(a, env), stamp,
                         quick=a.quick)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
