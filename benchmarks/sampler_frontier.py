"""Quality against network evaluations: every sampler at 10, 15, 25, 50 and 100 evaluations against the
reference PredictorCorrector (1000 steps, snr 0.15: sample.py's paper protocol, 2,000 evaluations).

    python -m benchmarks.sampler_frontier --ckpt CKPT [--label NAME] [--conditions 16] [--draws 2]
        [--nfe 10 15 25 50 100] [--samplers NAME ...] [--cache DIR] [--reference-only] [--floor]
    python -m benchmarks.sampler_frontier --gaussian          # distance to the exact posterior
    python -m benchmarks.sampler_frontier --cost              # cost per evaluation vs a bare forward
    python -m benchmarks.sampler_frontier --report --update-results   # table + plot into RESULTS.md

A checkpoint run samples `--conditions` test conditions (evenly spaced, `benchmarks.fmnist.conditions`)
x `--draws` draws in one batch, noise seed 1000, with the reference (cached in --cache as
ref_<label>.pt, keyed by the checkpoint's path, step and the protocol, so it is computed once) and with
every recipe of `recipes(n)` at each budget n; it stores the metrics (`benchmarks.fmnist.evaluate`:
PSNR, consistency, TV ratio, diversity) as frontier_<label>.json in --cache. `--report` gathers all
frontier_*.json of --cache (and gaussian.json, cost.json) into a table per checkpoint, the issue-23 target
verdict per recipe and a quality-vs-evaluations PNG; only `--update-results` writes them into
benchmarks/RESULTS.md and benchmarks/sampler_frontier.png (a quick or partial run touches no tracked file).

Target (issue 23): at <= 25 evaluations PSNR and consistency no more than 0.5 dB below PC-2000's, TV ratio
and diversity within 10% of PC-2000's; at <= 50 evaluations no more than 0.2 dB below.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import ROOT, environment, interleaved_times, replace_block
from benchmarks.fmnist import conditions, evaluate, standard_errors
from msdiff.run import TrainedRun
from msdiff.samplers import (DDIM, AdaptiveSDE, DPMSolverPC, DPMSolverPP, EDMStochastic, EulerMaruyama, Heun, HeunPC,
                             KarrasSigma, LogSigma, PredictorCorrector, Sampler)

BLOCK = "benchmarks/sampler_frontier.py"
BUDGETS = (10, 15, 25, 50, 100)
SEED = 1000
FLOOR_SEED = 1001
FLOOR = "PC-2000, noise seed 1001 (noise floor)"


def reference(steps: int = 1000) -> Sampler:
    """sample.py's paper protocol (DEFAULT_SAMPLER before issue 23): PC, 1000 steps, snr 0.15 (fewer
    steps only for a quick check of the script)."""
    return PredictorCorrector(steps, snr=0.15)


def heunpc_budget(n: int) -> HeunPC:
    """HeunPC shrunk to n evaluations: about a tenth of them Heun to sigma 0.5, the rest PC steps with
    one LM corrector step each, snr scaled to keep the reference's Langevin time below sigma 0.5
    (500 steps of snr 0.16: snr = 0.16 sqrt(500 / pc_steps), the rule that gave HeunPC's 0.55)."""
    heun = max(1, round(n * 0.08))
    pc = max(2, (n - 2 * heun) // 2)
    return HeunPC(heun, pc, snr=0.16 * math.sqrt(500 / pc))


def dpmpc_budget(n: int) -> DPMSolverPC:
    """DPMSolverPC at n evaluations: a fifth of them SDE-DPM-Solver++(2M) steps to sigma 0.5 (HeunPC's), the rest
    PC steps (LM corrector, snr by the Langevin-time rule)."""
    solver = max(1, round(n / 5))
    return DPMSolverPC(solver, max(1, (n - solver) // 2), sigma_switch=0.5)


def recipes(n: int) -> dict[str, Sampler]:
    """Every sampler at a budget of at most n evaluations per sample (one recipe per name, the same for
    every checkpoint)."""
    half = (n + 1) // 2  # Heun-type: 2 steps - 1 evaluations
    return {
        "EulerMaruyama": EulerMaruyama(n),
        "DDIM eta=1": DDIM(n, eta=1.0),
        "Heun": Heun(half),
        "EDM stochastic (churn 40)": EDMStochastic(half),
        "DPM-Solver++(2M)": DPMSolverPP(n),
        "SDE-DPM-Solver++(2M)": DPMSolverPP(n, stochastic=True),
        "SDE-DPM-Solver++(2M), log-sigma grid": DPMSolverPP(n, stochastic=True, grid=LogSigma()),
        "HeunPC (snr scaled)": heunpc_budget(n),
        "DPMSolverPC": dpmpc_budget(n),
        "PredictorCorrector (snr 0.15)": PredictorCorrector(max(1, n // 2), snr=0.15),  # the reference, shortened
    }


def ideas() -> dict[str, Sampler]:
    """The variants tried around 25 evaluations (`--ideas`): where the Langevin steps go and how large."""
    rule = 0.16 * math.sqrt(500 / 10)
    return {
        "idea: DPMSolverPC 5+10x2, snr x0.7": DPMSolverPC(5, 10, snr=0.7 * rule),
        "idea: DPMSolverPC 5+10x2, snr x1.2": DPMSolverPC(5, 10, snr=1.2 * rule),
        "idea: DPMSolverPC 5+10x2, Euler corrector": DPMSolverPC(5, 10, corrector="euler"),
        "idea: DPMSolverPC 5+10x2, switch 0.2": DPMSolverPC(5, 10, sigma_switch=0.2),
        "idea: DPMSolverPC 5+10x2, switch 1.0": DPMSolverPC(5, 10, sigma_switch=1.0),
        "idea: DPMSolverPC 5+5x4 (3 corrector steps per level)": DPMSolverPC(5, 5, corrector_steps=3),
        "idea: DPMSolverPC 3+11x2": DPMSolverPC(3, 11),
        "idea: DPMSolverPC 5+10x2, ODE above the switch": DPMSolverPC(5, 10, stochastic=False),
        "idea: HeunPC 2+10x2 (Heun above 0.5)": HeunPC(2, 10, snr=rule),
        "idea: EDM churn only below sigma 0.5 (S_tmax 0.5, S_churn 80)": EDMStochastic(13, s_churn=80.0, s_tmax=0.5),
        # second round, around the best of the first (switch 0.2: consistency -0.45 dB, diversity -20%)
        "idea: DPMSolverPC 5+10x2, switch 0.2, snr x0.9": DPMSolverPC(5, 10, sigma_switch=0.2, snr=0.9 * rule),
        "idea: DPMSolverPC 5+10x2, switch 0.2, snr x0.8": DPMSolverPC(5, 10, sigma_switch=0.2, snr=0.8 * rule),
        "idea: DPMSolverPC 5+10x2, switch 0.3": DPMSolverPC(5, 10, sigma_switch=0.3),
        "idea: DPMSolverPC 5+10x2, switch 0.1": DPMSolverPC(5, 10, sigma_switch=0.1),
        "idea: DPMSolverPC 5+10x2, switch 0.2, PC levels on the sigma^(1/7) grid":
            DPMSolverPC(5, 10, sigma_switch=0.2, pc_grid=KarrasSigma(7.0)),
        "idea: DPMSolverPC 4+7x3 (2 corrector steps per level), switch 0.2":
            DPMSolverPC(4, 7, sigma_switch=0.2, corrector_steps=2),
        # third round: the corrector's step from s(t), not from the network's score norm
        "idea: DPMSolverPC 5+10x2, sigma step": DPMSolverPC(5, 10, sigma_switch=0.5, sigma_step=True),
        "idea: DPMSolverPC 5+10x2, switch 0.2, sigma step": DPMSolverPC(5, 10, sigma_switch=0.2, sigma_step=True),
        "idea: DPMSolverPC 5+10x2, switch 0.2, sigma step, snr x0.8":
            DPMSolverPC(5, 10, sigma_switch=0.2, sigma_step=True, snr=0.8 * rule),
        "idea: DPMSolverPC 10+20x2, switch 0.2, sigma step (50)":
            DPMSolverPC(10, 20, sigma_switch=0.2, sigma_step=True),
        "idea: DPMSolverPC 10+20x2, switch 0.2 (50)": DPMSolverPC(10, 20, sigma_switch=0.2),
        "idea: DPMSolverPC 10+20x2, switch 0.2, snr x0.9 (50)": DPMSolverPC(10, 20, sigma_switch=0.2,
                                                                          snr=0.9 * 0.16 * math.sqrt(500 / 20)),
    }


ADAPTIVE = {"AdaptiveSDE eps_rel=0.5": AdaptiveSDE(eps_rel=0.5), "AdaptiveSDE eps_rel=0.1": AdaptiveSDE(eps_rel=0.1)}


def chosen(name: str, wanted: list[str]) -> bool:
    """Whether the recipe `name` is one of `wanted`, given by its full name or by its first word."""
    return any(name == w or name.startswith(w + " ") for w in wanted)


def draw(system, batch: dict, sampler: Sampler, draws: int, seed: int = SEED) -> tuple[torch.Tensor, float]:
    """(samples (draws, B, C, H, W), seconds): all draws in one batch, generator seed `seed`."""
    y = batch["y"].repeat(draws, 1, 1, 1)
    t0 = time.perf_counter()
    x = system.sample(y, sampler, generator=torch.Generator().manual_seed(seed))
    return x.reshape(draws, *batch["y"].shape[:1], *x.shape[1:]), time.perf_counter() - t0


def cached_reference(system, ckpt: Path, step, batch: dict, args, seed: int = SEED) -> torch.Tensor:
    """The reference samples at noise seed `seed`, computed once per (checkpoint, step, protocol, seed) and
    kept in --cache (ref_<label>.pt for SEED, ref_<label>_seed<seed>.pt for another)."""
    key = {"ckpt": str(ckpt.resolve()), "step": step, "conditions": args.conditions,
           "draws": args.draws, "seed": seed, "sampler": f"PredictorCorrector({args.reference_steps}, snr=0.15)"}
    path = Path(args.cache) / (f"ref_{args.label}.pt" if seed == SEED else f"ref_{args.label}_seed{seed}.pt")
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if stored["key"] == json.dumps(key, sort_keys=True):
            return stored["samples"]
        print(f"{path}: made for another checkpoint or protocol; recomputing", flush=True)
    samples, sec = draw(system, batch, reference(args.reference_steps), args.draws, seed)
    print(f"reference (seed {seed}): {sec:.0f} s", flush=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": json.dumps(key, sort_keys=True), "samples": samples, "seconds": sec}, tmp)
    tmp.replace(path)
    return samples


def run_checkpoint(args) -> int:
    torch.manual_seed(0)
    ckpt = Path(args.ckpt)
    trained = TrainedRun.open(ckpt)
    system = trained.system()
    batch, task = conditions(trained, args.conditions)
    mask = batch.get("mask")
    ref = cached_reference(system, ckpt, trained.step, batch, args)
    if args.reference_only:
        return 0
    out = Path(args.cache) / f"frontier_{args.label}.json"
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    rows = [] if args.fresh else earlier.get("rows", [])
    done = {(r["sampler"], r["budget"]) for r in rows}
    ref_row = {"sampler": "PC-2000 (reference)", "budget": 2000, "nfe": 2 * args.reference_steps, "seconds": None,
               **evaluate(ref, batch["x"], batch["y"], task, mask),
               **standard_errors(ref, batch["x"], batch["y"], task, mask)}
    floor = earlier.get("floor")  # kept from an earlier run unless measured now
    if args.floor:  # the reference against itself: how far two noise seeds of the same sampler land apart
        again = cached_reference(system, ckpt, trained.step, batch, args, seed=FLOOR_SEED)
        floor = {"sampler": FLOOR, "budget": 2000, "nfe": 2 * args.reference_steps, "seconds": None,
                 **evaluate(again, batch["x"], batch["y"], task, mask)}
    todo: list[tuple[str, int, Sampler]] = [(name, s.nfe, s) for name, s in ideas().items()] if args.ideas else []
    for n in args.nfe:
        todo += [(name, n, s) for name, s in recipes(n).items() if not args.samplers or chosen(name, args.samplers)]
    if args.adaptive:
        todo += [(name, 0, s) for name, s in ADAPTIVE.items()]
    for name, n, sampler in todo:
        if (name, n) in done:
            continue
        samples, sec = draw(system, batch, sampler, args.draws)
        row = {"sampler": name, "budget": n, "nfe": sampler.nfe, "seconds": sec,
               **evaluate(samples, batch["x"], batch["y"], task, mask)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(out, args, ckpt, trained.step, ref_row, floor, rows)
    save(out, args, ckpt, trained.step, ref_row, floor, rows)
    return 0


def save(out: Path, args, ckpt: Path, step, ref_row: dict, floor: dict | None, rows: list[dict]) -> None:
    """frontier_<label>.json: the reference, the noise floor (None when never measured) and the rows."""
    out.write_text(json.dumps({"label": args.label, "ckpt": str(ckpt), "step": step, "conditions": args.conditions,
                               "draws": args.draws, "reference": ref_row, "floor": floor, "rows": rows}, indent=1))


def run_gaussian(args) -> int:
    """Distance of each recipe's samples to the exact posterior of the Gaussian field (SR x2, noise 0.05;
    4 conditions x 500 draws), on VE, VP and sub-VP."""
    from msdiff.gaussian import GaussianField, GaussianInverseProblem, posterior_error
    from msdiff.sde import VESDE, VPSDE, SubVPSDE
    from msdiff.utils import make_generator

    problem = GaussianInverseProblem.super_resolution(GaussianField(1, 4, length_scale=1.5), factor=2, noise_std=0.05)
    y = problem.sample(4, make_generator(0))[1]
    k, rows = 500, []
    for sde_name, sde in {"VE": VESDE(0.01, 50.0), "VP": VPSDE(0.1, 20.0), "sub-VP": SubVPSDE(0.1, 20.0)}.items():
        yy = y.repeat(k, 1, 1, 1)
        todo = [(name, n, s) for n in args.nfe for name, s in recipes(n).items()]
        todo += [(name, 0, s) for name, s in ADAPTIVE.items()] + [("PC-2000 (reference)", 2000, reference())]
        for name, n, sampler in todo:
            g = make_generator(1)
            x = sampler(lambda v, t: problem.conditional_score(v, yy, t, sde), sde, sde.prior_sampling(yy.shape, g), g)
            err = posterior_error(x.reshape(k, 4, *problem.shape), y, problem)
            rows.append({"sde": sde_name, "sampler": name, "budget": n, "nfe": sampler.nfe, **err})
            print(json.dumps(rows[-1]), flush=True)
    (Path(args.cache) / "gaussian.json").write_text(json.dumps(rows, indent=1))
    return 0


def run_cost(args) -> int:
    """Seconds per evaluation of each sampler (at 50 evaluations) over one bare score evaluation, on the
    CPU at the quickstart size (U-Net ch 32, 3x32x32, CMDE, batch 8); medians of interleaved repeats."""
    from msdiff.estimators import CMDE, EDMPrecond
    from msdiff.nn.unet import UNet
    from msdiff.sde import MultiSpeedSDE, VESDE

    torch.manual_seed(0)
    net = UNet(in_channels=6, out_channels=6, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
               image_size=32, dropout=0.0).eval()
    est = CMDE(sde=MultiSpeedSDE(VESDE(0.01, 20.0), VESDE(0.005, 0.5)), preconditioning=EDMPrecond())
    sde, y = est.sampling_sde, torch.rand(8, 3, 32, 32)
    score = est.score_fn(net, y, torch.Generator().manual_seed(0))
    x, t = sde.prior_sampling(y.shape, torch.Generator().manual_seed(1)), torch.full((8,), 0.5)
    samplers = {name: s for name, s in recipes(50).items()}
    fns: dict[str, Callable] = {"bare score evaluation": lambda: score(x, t)}
    with torch.no_grad():
        fns["bare network forward"] = lambda: net(torch.cat([x, y], 1), t)
        for name, s in samplers.items():
            fns[name] = (lambda s=s: s(score, sde, x, torch.Generator().manual_seed(2)))
        times = interleaved_times(fns, repeats=args.repeats, warmup=1)
    base = times["bare score evaluation"]
    rows = []
    for name, tm in times.items():
        nfe = samplers[name].nfe if name in samplers else 1
        rows.append({"sampler": name, "nfe": nfe, "seconds": tm["median"], "min_seconds": tm["min"],
                     "per_eval_ratio": tm["median"] / nfe / base["median"],
                     "per_eval_ratio_min": tm["min"] / nfe / base["min"]})
    rows += overhead_rows(samplers, sde, x, times["bare score evaluation"]["median"], args.repeats)
    for r in rows:
        print(json.dumps(r), flush=True)
    (Path(args.cache) / "cost.json").write_text(json.dumps({"env": environment("cpu"), "rows": rows}, indent=1))
    return 0


def overhead_rows(samplers: dict[str, Sampler], sde, x: torch.Tensor, evaluation: float, repeats: int) -> list[dict]:
    """The samplers' own work per evaluation (a free score: one precomputed tensor) over one score evaluation
    of `evaluation` seconds: what a sampler adds to a bare forward, little disturbed by a shared machine's load."""
    free = torch.randn_like(x)
    with torch.no_grad():
        fns = {name: (lambda s=s: s(lambda v, t: free, sde, x, torch.Generator().manual_seed(2)))
               for name, s in samplers.items()}
        times = interleaved_times(fns, repeats=repeats, warmup=1)
    return [{"sampler": f"{name}, own work (free score)", "nfe": samplers[name].nfe, "seconds": tm["median"],
             "min_seconds": tm["min"], "per_eval_ratio": 1 + tm["median"] / samplers[name].nfe / evaluation,
             "per_eval_ratio_min": 1 + tm["min"] / samplers[name].nfe / evaluation} for name, tm in times.items()]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.frontier_report import report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None)
    p.add_argument("--label", default=None, help="name of the checkpoint in the cache and tables (default: its run)")
    p.add_argument("--gaussian", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--conditions", type=int, default=16)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--nfe", type=int, nargs="+", default=list(BUDGETS))
    p.add_argument("--samplers", nargs="*", default=None, help="only these recipes (full name or first word)")
    p.add_argument("--adaptive", action="store_true", help="also the AdaptiveSDE tolerances (NFE as they come)")
    p.add_argument("--ideas", action="store_true", help="also the variants of ideas() around 25 evaluations")
    p.add_argument("--reference-only", action="store_true")
    p.add_argument("--floor", action="store_true",
                   help="also the reference at noise seed 1001: how far the metrics move with the noise alone")
    p.add_argument("--reference-steps", type=int, default=1000, help="PC steps of the reference (1000: the protocol)")
    p.add_argument("--fresh", action="store_true", help="ignore the rows already in the cache")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/sampler_frontier", help="reference samples and results (JSON)")
    p.add_argument("--update-results", action="store_true", help="write the report into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.conditions < 1 or args.draws < 2 or min(args.nfe) < 2:
        p.error("--conditions >= 1, --draws >= 2 (diversity is compared) and every --nfe >= 2")
    torch.set_num_threads(args.threads)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.ckpt:
        args.label = args.label or Path(args.ckpt).resolve().parents[1].name
        run_checkpoint(args)
    if args.gaussian:
        run_gaussian(args)
    if args.cost:
        run_cost(args)
    if args.report:
        cmd = "python -m benchmarks.sampler_frontier " + " ".join(argv if argv is not None else sys.argv[1:])
        text = report(Path(args.cache), cmd, environment("cpu"), Path(__file__).resolve().parent
                      if args.update_results else Path(args.cache))
        if args.update_results:
            path = ROOT / "benchmarks" / "RESULTS.md"
            path.write_text(replace_block(path.read_text(), BLOCK, text, after_title=False))
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
