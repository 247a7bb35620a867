"""What sample.py's per-condition noise costs (issue 15, item 4).

    .venv/bin/python -m benchmarks.noise_cost [--device cpu|cuda] [--repeats 5]

1. One draw of B rows, each from its own stream: the former way (``torch.cat`` of one ``randn``
   per row, each from its own ``torch.Generator``: a Python loop, B kernel launches on a GPU)
   against ``ExampleNoise`` (every row in one vectorised call), in ms.
2. The samplers' time per network evaluation over a bare no-grad forward, with sample.py's noise,
   for the quickstart-size U-Net at batch 32 (32x32) and the SR-160 U-Net at batch 1 (160x160):
   PC, Euler-Maruyama and DDIM with eta 1 at 20 evaluations each (4 at 160x160), timed in turn
   (``common.interleaved_times``), medians.

Part 2 also runs in a checkout from before ``ExampleNoise`` (commit d4d49ff and earlier, where
sample.py's noise was ``example_generators``, the per-row loop): run it in both trees, alternately,
for a before/after figure on one machine.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import common
import torch

from msdiff.guidance import Unguided
from msdiff.nn.unet import UNet
from msdiff.samplers import DDIM, EulerMaruyama, PredictorCorrector
from benchmarks.sections_unet import make_estimator, make_net

try:
    from msdiff.utils import example_noise as per_condition_noise
except ImportError:  # a checkout from before ExampleNoise: one torch.Generator per row
    from msdiff.utils import example_generators as per_condition_noise


def draw_times(device: str, repeats: int) -> list[str]:
    """Part 1 (module doc): markdown rows."""
    from msdiff.utils import ExampleNoise

    rows = ["| shape | per-row loop ms | ExampleNoise ms |", "|---|---|---|"]
    for shape in [(32, 3, 32, 32), (32, 3, 160, 160), (1, 3, 160, 160)]:
        gens = [torch.Generator(device).manual_seed(i) for i in range(shape[0])]
        noise = ExampleNoise(range(shape[0]), device)
        fns = {"loop": lambda: torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device) for g in gens]),
               "vectorised": lambda: noise.randn(shape)}
        t = common.interleaved_times(fns, repeats, 2, device)
        rows.append(f"| {' x '.join(map(str, shape))} | {1e3 * t['loop']['median']:.2f} | "
                    f"{1e3 * t['vectorised']['median']:.2f} |")
    return rows


def quickstart_net() -> UNet:
    """configs/quickstart.yaml's U-Net."""
    return UNet(in_channels=6, out_channels=6, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                image_size=32, dropout=0.0)


def sampler_ratios(net: torch.nn.Module, size: int, batch: int, nfe: int, device: str, repeats: int) -> str:
    """Part 2 (module doc): one markdown row; each sampler makes `nfe` network evaluations."""
    torch.manual_seed(0)
    net = net.to(device).eval()
    est = make_estimator(size)
    y = torch.rand(batch, 3, size, size, device=device)
    inp, label = torch.randn(batch, 6, size, size, device=device), torch.rand(batch, device=device)

    @torch.no_grad()
    def forwards() -> None:
        for _ in range(nfe):
            net(inp, label)

    def sample(sampler):
        @torch.no_grad()
        def run() -> None:
            noise = per_condition_noise(0, range(batch), 0, device)
            Unguided().sample(est, net, y, sampler, 3, generator=noise)
        return run

    fns = {"forward": forwards, "PC": sample(PredictorCorrector(nfe // 2)), "EM": sample(EulerMaruyama(nfe)),
           "DDIM": sample(DDIM(nfe, eta=1.0))}
    t = common.interleaved_times(fns, repeats, 1, device)
    bare = t["forward"]["median"] / nfe
    return (f"| {size}x{size}, batch {batch} | {1e3 * bare:.1f} | "
            + " | ".join(f"{t[k]['median'] / nfe / bare:.3f}" for k in ("PC", "EM", "DDIM")) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(f"{per_condition_noise.__module__}.{per_condition_noise.__name__}; {common.environment(a.device)}\n")
    if per_condition_noise.__name__ == "example_noise":
        print("\n".join(draw_times(a.device, 2 * a.repeats)) + "\n", flush=True)
    print("| network | bare forward ms | PC / forward | EM / forward | DDIM eta 1 / forward |\n|---|---|---|---|---|")
    print(sampler_ratios(quickstart_net(), 32, 32, 20, a.device, a.repeats), flush=True)
    print(sampler_ratios(make_net(False), 160, 1, 4, a.device, a.repeats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
