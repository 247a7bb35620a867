"""The ``gpu`` section of benchmarks/run.py: training and sampling at the network's own speed.

Three measurements, in one run on one device (``--device cuda`` is the point; ``--device cpu
--quick`` only checks that the command works):

1. **Network alone**: the SR-160 U-Net's training step (CMDE loss, backward, fused Adam) with no
   pipeline around it, at batch 32, in fp32 with TF32 off, TF32, bf16 autocast, and bf16 with
   channels_last and/or ``torch.compile`` (the compile time is reported as the extra time of the
   first call). Rate = batch x steps / time of a block of steps with one synchronisation at its end
   (the steady-state throughput a training loop sees); the median of three blocks.
2. **train.py**: the whole pipeline (``ScoreSystem`` step, EMA, clipping and norm logging, the
   non-finite guard, the loader with its workers, TensorBoard) as a user runs it:
   ``train.py --config sr8x_cmde.yaml`` on the procedural Shapes at 160 (no download), 1 device,
   validation and checkpoints out of the timed window. The rate is read from the wall-clock times
   of the ``train/loss`` events (TensorBoard) between two steps past the warm-up, so start-up,
   compilation and the final checkpoint are not in it. Pipeline efficiency = this rate / the
   network-alone rate at the same precision.
3. **Sampling**: per network evaluation, the cost of a sampler step (PC, Heun, HeunPC with one
   noise stream per condition, as sample.py draws them) against a bare no-grad forward of the same
   network at the same batch, and the peak memory after 2 and 4 steps (equal: flat in steps).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from benchmarks import common
import torch
import yaml

from msdiff.guidance import Unguided
from msdiff.samplers import Heun, HeunPC, PredictorCorrector
from msdiff.utils import example_noise
from benchmarks.sections_unet import make_estimator, make_net

# (label, bf16 autocast, channels_last, torch.compile); TF32 is on in every row but "fp32"
NETWORK_MODES = (("fp32 (TF32 off)", False, False, False), ("TF32", False, False, False),
                 ("bf16", True, False, False), ("bf16 + channels_last", True, True, False),
                 ("bf16 + compile", True, False, True), ("bf16 + channels_last + compile", True, True, True))
# (label, trainer.precision, TF32) of the train.py rows
PIPELINE_MODES = (("fp32 (TF32 off)", "32-true", False), ("TF32", "32-true", True), ("bf16", "bf16-mixed", True))
# the score_sde_pytorch DDPM U-Net's network-alone bf16 rate on an H100 at SR-160, batch 32 (issue 15)
REFERENCE_BF16_IMG_S = 201.1


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core matmuls and convolutions on or off inside the block (CUDA; no-op on CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def block_rate(step: Callable[[], None], images_per_step: int, steps: int, blocks: int, device: str) -> float:
    """Median over `blocks` of images/s of `steps` calls of `step` timed with one sync at the end."""
    rates = []
    for _ in range(blocks):
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        common.sync(device)
        rates.append(images_per_step * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def network_rate(quick: bool, batch: int, device: str, bf16: bool, channels_last: bool, compile: bool,
                 steps: int, blocks: int) -> dict:
    """Training-step rate of the U-Net alone (module doc, 1) in the current TF32 setting."""
    torch.manual_seed(0)
    net = make_net(quick).to(device)
    size = net.image_size
    est = make_estimator(size)
    g = torch.Generator(device).manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g, device=device)
    y = torch.rand(batch, 3, size, size, generator=g, device=device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x, y = (v.contiguous(memory_format=torch.channels_last) for v in (x, y))
    forward = torch.compile(net) if compile else net
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=True)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = est.loss(forward, x, y, generator=g).float().mean()
        loss.backward()
        opt.step()

    _reset_peak(device)
    common.sync(device)
    t0 = time.perf_counter()
    step()  # first call: includes compilation
    common.sync(device)
    first = time.perf_counter() - t0
    step()
    rate = block_rate(step, batch, steps, blocks, device)
    return {"img_s": rate, "first_call_extra_s": max(first - batch / rate, 0.0), "peak_mib": _peak_mib(device)}


def pipeline_config(quick: bool, batch: int, precision: str, workers: int, steps: int, device: str) -> dict:
    """configs/sr8x_cmde.yaml on Shapes at its image size, 1 device, `steps` steps, no validation, one
    checkpoint at the end (tiny network and 16 px when `quick`)."""
    import train

    cfg = train.resolved_config(common.ROOT / "configs" / "sr8x_cmde.yaml")
    net = cfg["model"]["init_args"]["net"]["init_args"]
    if quick:
        net.update(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], image_size=16)
    size = net["image_size"]
    cfg["model"]["init_args"]["estimator"]["init_args"]["sde"]["init_args"]["x"]["init_args"]["sigma_max"] = \
        float((3 * size * size) ** 0.5)
    cfg["trainer"].update(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, strategy="auto",
                          precision=precision, max_steps=steps, val_check_interval=None, limit_val_batches=0,
                          num_sanity_val_steps=0, log_every_n_steps=1 if quick else 10,
                          enable_progress_bar=True)  # as users run it (its output is captured)
    cfg["checkpoint"] = {"every_n_steps": 10 * steps}
    data = cfg["data"]["init_args"]
    data["dataset"] = {"class_path": "msdiff.datasets.Shapes",
                       "init_args": {"image_size": size, "flip": True,
                                     "task": {"class_path": "msdiff.tasks.SuperResolution",
                                              "init_args": {"factor": 8 if size >= 64 else 4}}}}
    data.update(batch_size=batch, num_workers=workers, pin_memory=device.startswith("cuda"),
                persistent_workers=workers > 0)
    return cfg


def loss_event_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every ``train/loss`` scalar in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.wall_time) for e in acc.Scalars("train/loss")]


def pipeline_rate(quick: bool, batch: int, device: str, precision: str, tf32_on: bool, workers: int, warmup: int,
                  steps: int, timeout: float) -> dict:
    """train.py's steady-state rate (module doc, 2): images/s between the first loss event at or after
    `warmup` steps and the last one."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump(pipeline_config(quick, batch, precision, workers, warmup + steps, device)))
        cmd = [sys.executable, str(common.ROOT / "train.py"), "--config", str(cfg_path), "--trainer.default_root_dir",
               tmp, "--name", "bench", "--tf32", str(tf32_on).lower()]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(common.ROOT), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"train.py failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        events = [e for e in loss_event_times(Path(tmp) / "bench") if e[0] >= warmup]
    (s0, w0), (s1, w1) = events[0], events[-1]
    return {"img_s": batch * (s1 - s0) / (w1 - w0), "steps_timed": s1 - s0, "wall_s": wall}


def sampler_cost(quick: bool, batch: int, device: str, steps: int, repeats: int) -> list[dict]:
    """Seconds per network evaluation of each sampler vs a bare forward at the same batch (module doc, 3)."""
    torch.manual_seed(0)
    net = make_net(quick).to(device).eval()
    size = net.image_size
    est = make_estimator(size)
    y = torch.rand(batch, 3, size, size, device=device)
    inp = torch.randn(batch, 6, size, size, device=device)
    label = torch.rand(batch, device=device)

    @torch.no_grad()
    def forward() -> None:
        net(inp, label)

    def sample(sampler) -> Callable[[], None]:
        def run() -> None:
            gens = example_noise(0, range(batch), 0, device)  # one stream per condition
            with torch.no_grad():
                Unguided().sample(est, net, y, sampler, 3, generator=gens)
        return run

    samplers = {"PC": PredictorCorrector(steps), "Heun": Heun(steps), "HeunPC": HeunPC(steps, steps)}
    fns = {"forward": forward, **{k: sample(s) for k, s in samplers.items()}}
    times = common.interleaved_times(fns, repeats, 1, device)
    bare = times["forward"]["median"]
    rows = []
    for name, s in samplers.items():
        per_nfe = times[name]["median"] / s.nfe
        mem = []
        for n in (2, 4):
            _reset_peak(device)
            small = type(s)(n) if name != "HeunPC" else HeunPC(n, n)
            sample(small)()
            mem.append(_peak_mib(device))
        rows.append({"sampler": name, "nfe": s.nfe, "s_per_nfe": per_nfe, "ratio": per_nfe / bare,
                     "forward_s": bare, "peak_mib": mem})
    return rows


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def section_gpu(a: argparse.Namespace) -> str:
    """Network-alone rates, train.py rates and sampler cost on one device (module doc)."""
    dev = a.device
    quick = a.quick
    batch = 4 if quick else a.gpu_batch
    steps, blocks = (2, 1) if quick else (20, 3)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU ({common.environment(dev)['cpu']})"
    modes = [m for m in NETWORK_MODES if dev.startswith("cuda") or not m[3]]  # compile: GPU runs only
    net_rows = ["| precision | images/s | first-call extra s (compile) | peak MiB |", "|---|---|---|---|"]
    net = {}
    for label, bf16, cl, comp in modes:
        with tf32(label != "fp32 (TF32 off)"):
            r = network_rate(quick, batch, dev, bf16, cl, comp, steps, blocks)
        net[label] = r
        net_rows.append(f"| {label} | {r['img_s']:.1f} | {r['first_call_extra_s']:.1f} | {_fmt(r['peak_mib'])} |")
        print(net_rows[-1], flush=True)
    warmup, timed = (2, 4) if quick else (30, 100)
    workers = 0 if quick else a.gpu_workers
    pipe_rows = ["| precision | train.py images/s | network alone | pipeline efficiency | steps timed | wall s |",
                 "|---|---|---|---|---|---|"]
    pipe = {}
    for label, precision, tf32_on in PIPELINE_MODES:
        r = pipeline_rate(quick, batch, dev, precision, tf32_on, workers, warmup, timed, timeout=600)
        pipe[label] = r
        eff = r["img_s"] / net[label]["img_s"]
        pipe_rows.append(f"| {label} | {r['img_s']:.1f} | {net[label]['img_s']:.1f} | {eff:.2f} | {r['steps_timed']} | "
                         f"{r['wall_s']:.0f} |")
        print(pipe_rows[-1], flush=True)
    s_rows = ["| sampler | NFE | ms per NFE | bare forward ms | ratio | peak MiB after 2 / 4 steps |",
              "|---|---|---|---|---|---|"]
    costs = sampler_cost(quick, batch, dev, 2 if quick else 10, a.repeats)
    for r in costs:
        s_rows.append(f"| {r['sampler']} | {r['nfe']} | {1e3 * r['s_per_nfe']:.2f} | {1e3 * r['forward_s']:.2f} | "
                      f"{r['ratio']:.2f} | {_fmt(r['peak_mib'][0])} / {_fmt(r['peak_mib'][1])} |")
        print(s_rows[-1], flush=True)
    bf16_pipe, fp32_pipe = pipe["bf16"]["img_s"], pipe["fp32 (TF32 off)"]["img_s"]
    worst = max(r["ratio"] for r in costs)
    verdict = lambda ok: "**met**" if ok else "**missed**"  # noqa: E731
    return "\n".join([
        f"Device: {name}. {'Tiny U-Net at 16x16, ' if quick else 'SR-160 U-Net (43.5M parameters), '}batch {batch}. "
        f"Network alone: {steps} steps per block, median of {blocks} blocks; train.py: `sr8x_cmde.yaml` on Shapes, "
        f"{workers} loader workers, rate between steps {warmup} and {warmup + timed} from the TensorBoard event times. "
        "See benchmarks/sections_gpu.py for the method.", "",
        "Network alone (training step: forward, CMDE loss, backward, fused Adam):", "", *net_rows, "",
        "train.py (whole pipeline):", "", *pipe_rows, "",
        "Sampling, per network evaluation (one noise stream per condition, as sample.py):", "", *s_rows, "",
        f"- Target: train.py bf16 >= 3x train.py fp32 (TF32 off): x{bf16_pipe / fp32_pipe:.2f} -> "
        f"{verdict(bf16_pipe >= 3 * fp32_pipe)}.",
        f"- Target: train.py bf16 >= 0.9 of the network-alone bf16 rate: {bf16_pipe / net['bf16']['img_s']:.2f} -> "
        f"{verdict(bf16_pipe >= 0.9 * net['bf16']['img_s'])}.",
        f"- Target: train.py bf16 >= 1.2 x score_sde's DDPM network-alone bf16 rate on an H100 ({REFERENCE_BF16_IMG_S} "
        f"img/s): {bf16_pipe:.1f} img/s -> {verdict(bf16_pipe >= 1.2 * REFERENCE_BF16_IMG_S)}"
        + ("" if "H100" in name else " (not an H100: this comparison says little)") + ".",
        f"- Target: sampler cost per evaluation <= 1.3x a bare forward: worst x{worst:.2f} -> {verdict(worst <= 1.3)}."])
