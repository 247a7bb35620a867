"""Data pipeline throughput: decoded + degraded examples per second per loader worker.

    .venv/bin/python -m benchmarks.data_pipeline [--n 300] [--loader-workers 2] [--update-results]

Writes `--n` synthetic files to a temporary folder (178x218 JPEGs for the CelebA path,
256x512 edges|photo JPEGs for edges2shoes), then times `dataset[i]` for every example in one
process with one intra-op thread (what a DataLoader worker runs), and the same through a
`ResumableLoader` with `--loader-workers` workers and batch 16 (collation and IPC included).
The table goes under "## Data pipeline" of runs/benchmarks/RESULTS.md (benchmarks/RESULTS.md with
`--update-results`).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import add_results_arguments, results_path
from msdiff.data import ResumableLoader, ResumableSampler
from msdiff.datasets import CelebA, Edges2Shoes, GaussianFieldDataset, ImageFolder, Shapes, procedural_image
from msdiff.images import resize
from msdiff.tasks import Edges, Inpainting, SuperResolution
from msdiff.utils import make_generator, mix_seed, tensor_to_uint8


def write_files(root: Path, n: int) -> None:
    """n face-sized JPEGs (178x218, quality 90) and n edges2shoes-format pairs (256x512)."""
    for i in range(n):
        img = procedural_image(96, make_generator(mix_seed(123, i)))
        face = resize(img, (218, 178))
        path = root / "celeba" / "img_align_celeba" / f"{i + 1:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tensor_to_uint8(face)).save(path, quality=90)
        photo = resize(img, 256)
        pair = torch.cat([Edges(channels=3)(photo[None])[0], photo], dim=-1)
        path = root / "edges2shoes" / "train" / f"{i}_AB.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tensor_to_uint8(pair)).save(path, quality=90)


def per_worker(ds, repeats: int = 2) -> float:
    """Examples/s of dataset[(epoch, i)] in this process (one thread), best of `repeats` passes."""
    best = 0.0
    for epoch in range(repeats):
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[(epoch, i)]
        best = max(best, len(ds) / (time.perf_counter() - t))
    return best


def per_worker_rates(ds, repeats: int = 2) -> tuple[float, float]:
    """(examples/s of wall time, examples per CPU-second) of dataset[(epoch, i)] in this process, best of
    `repeats` passes; the CPU-time rate is what one worker delivers when it has a core to itself."""
    wall = cpu = 0.0
    for epoch in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for i in range(len(ds)):
            ds[(epoch, i)]
        wall = max(wall, len(ds) / (time.perf_counter() - t))
        cpu = max(cpu, len(ds) / max(time.process_time() - c, 1e-9))
    return wall, cpu


def through_loader(ds, workers: int) -> float:
    loader = ResumableLoader(ds, ResumableSampler(ds, seed=0), batch_size=16, num_workers=workers, drop_last=True)
    t = time.perf_counter()
    n = sum(batch["x"].shape[0] for batch in loader)
    return n / (time.perf_counter() - t)


def dataset_cases(root: Path, n: int) -> list[tuple[str, object]]:
    """(name, dataset) for every dataset/task pair of the table, on the files of `write_files(root, n)`."""
    return [
        ("CelebA 178x218 JPEG -> 160, SR 8x", CelebA("train", SuperResolution(8), root=str(root / "celeba"), holdout=0.0)),
        ("CelebA 178x218 JPEG -> 128, inpainting", CelebA("train", Inpainting(), root=str(root / "celeba"), image_size=128, holdout=0.0)),
        ("ImageFolder (same JPEGs) -> 64, edges", ImageFolder("train", Edges(), root=str(root / "celeba"), image_size=64, holdout=0.0)),
        ("edges2shoes 256x512 JPEG pairs -> 64", Edges2Shoes("train", root=str(root / "edges2shoes"))),
        ("Shapes (embedded) 32, SR 4x", Shapes("train", SuperResolution(4), image_size=32, length=n)),
        ("Shapes (embedded) 64, SR 8x", Shapes("train", SuperResolution(8), image_size=64, length=n)),
        ("Shapes (embedded) 160, SR 8x", Shapes("train", SuperResolution(8), image_size=160, length=n)),
        ("GaussianFieldDataset 1x8x8, SR 2x", GaussianFieldDataset("train", length=n)),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--loader-workers", type=int, default=2)
    add_results_arguments(p)
    args = p.parse_args()
    try:
        path = results_path(args.output, args.update_results)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_files(root, args.n)
        cases = dataset_cases(root, args.n)
        rows = []
        for name, ds in cases:
            one = per_worker(ds)
            loader = through_loader(ds, args.loader_workers)
            rows.append(f"| {name} | {len(ds)} | {one:,.0f} | {loader:,.0f} |")
            print(rows[-1], flush=True)
    cmd = f".venv/bin/python -m benchmarks.data_pipeline --n {args.n} --loader-workers {args.loader_workers}"
    section = "\n".join([
        "## Data pipeline", "",
        f"`{cmd}` on a shared 2-core CPU ({platform.processor() or platform.machine()}; other jobs running, "
        f"load average {os.getloadavg()[0]:.1f} at the end, so absolute figures are pessimistic), "
        f"torch {torch.__version__}. Examples/s per worker: `dataset[(epoch, i)]` (decode, crop, resize, flip, "
        f"task) in one process with one thread, as a DataLoader worker runs it. Loader: a `ResumableLoader`, "
        f"batch 16, {args.loader_workers} workers, collation included (bounded by the 2 shared cores). "
        "Synthetic files: procedural images saved as 178x218 JPEGs (quality 90) and 256x512 edges|photo pairs. "
        "Target (issue 9): >= 300 examples/s per worker for CelebA-size JPEGs with SR.", "",
        "| dataset and task | examples | examples/s per worker | examples/s through the loader |",
        "|---|---|---|---|", *rows, ""])
    print(section)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Data pipeline\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
