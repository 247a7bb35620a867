"""The paper's metrics from the files of one or several sample.py output directories (layer 3).

`evaluate_dirs(dirs, build, device)` reads the manifests (`msdiff.sampling.manifest`): every
directory must hold the same settings (the jobs of one `--shard` run, or one directory), and
together they must hold every (condition, draw) of the run, verified against its digest. The
metrics are then computed from the 8-bit PNGs on disk and the exact conditions
(`conditions/NAME.pt`), in chunks of `EVAL_CHUNK` conditions in index order: the numbers depend
only on the files, not on how the samples were batched, sharded or interrupted, so an interrupted
run, a sharded one and an uninterrupted one give the same metrics bit for bit. A Gaussian-field
task also gets the exact posterior error and joint Frechet distance of the raw draws
(`raw/NAME_drawK.pt`). SIGUSR1/SIGTERM stop it between chunks (`msdiff.callbacks.Preempted`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from msdiff import signals
from msdiff.callbacks import Preempted
from msdiff.images import read_image
from msdiff.metrics import ConditionalSampleMetrics, merge_per_image
from msdiff.sampling.layout import TASK_FILE, raw_file, read_tensor_file, sample_file
from msdiff.sampling.manifest import finished_units, read_settings, settings_digest
from msdiff.tasks import Task

__all__ = ["EVAL_CHUNK", "evaluate_dirs", "shared_settings"]

EVAL_CHUNK = 16  # conditions per metric update: fixed, so that the feature networks see the same batches


def shared_settings(dirs: list[Path]) -> dict[str, Any]:
    """The settings all `dirs` share; ValueError naming a directory without a manifest or one whose
    settings differ (with the keys)."""
    first: Optional[dict[str, Any]] = None
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"--evaluate {d}: not a directory")
        s = read_settings(d)
        if s is None:
            raise ValueError(f"--evaluate {d}: no manifest.json (not a sample.py output directory of this version)")
        if first is None:
            first = s
        elif s != first:
            keys = sorted(k for k in {*s, *first} if s.get(k) != first.get(k))
            raise ValueError(f"--evaluate {d}: samples of other settings than {dirs[0]} ({', '.join(keys)} differ); "
                             "evaluate the directories of one run together")
    assert first is not None
    return first


def evaluate_dirs(dirs: list[Path], build: Callable[[Optional[Task], int], ConditionalSampleMetrics],
                  device: str = "cpu") -> dict[str, Any]:
    """{"metrics", "notes", "per_image"[, "gaussian"], "settings"} of the run in `dirs` (module doc).
    build(task, draws) makes the metric accumulator. ValueError naming what is missing."""
    dirs = [Path(d) for d in dirs]
    settings = shared_settings(dirs)
    n, k_draws, digest = int(settings["conditions"]), int(settings["draws"]), settings_digest(settings)
    where: dict[tuple[int, Optional[int]], tuple[Path, dict]] = {}
    for d in dirs:
        for key, rec in finished_units(d, digest).items():
            where.setdefault(key, (d, rec))
    missing = [(i, k) for i in range(n) for k in (None, *range(k_draws)) if (i, k) not in where]
    if missing:
        i, k = missing[0]
        what = "its condition files" if k is None else f"draw {k}"
        raise ValueError(f"--evaluate {' '.join(map(str, dirs))}: {len(missing)} of {n * (k_draws + 1)} files of the "
                         f"run are missing or do not match the manifest (first: condition {i}, {what}); rerun the "
                         "sampling command (each --shard) into its directory to finish them")
    task = read_tensor_file(dirs[0] / TASK_FILE, trusted_objects=True)
    if task is not None and not isinstance(task, Task):
        raise ValueError(f"{dirs[0] / TASK_FILE}: expected a msdiff.tasks.Task, got {type(task).__name__}")
    metrics = build(task, k_draws).to(device)
    problem = task.gaussian_problem() if task is not None else None
    raws, ys, names = [], [], {}
    with torch.no_grad():
        for start in range(0, n, EVAL_CHUNK):
            if signals.preemption_signal() is not None:
                raise Preempted("during the evaluation")
            idx = list(range(start, min(start + EVAL_CHUNK, n)))
            conds = []
            for i in idx:
                d, rec = where[(i, None)]
                names[i] = rec.get("name")
                conds.append(read_tensor_file(d / f"conditions/{rec['name']}.pt"))
            y = torch.stack([c["y"] for c in conds])
            x = torch.stack([c["x"] for c in conds]) if all(c["x"] is not None for c in conds) else None
            mask = torch.stack([c["mask"] for c in conds]) if all(c["mask"] is not None for c in conds) else None
            samples = torch.stack([torch.stack([_read_sample(*where[(i, k)], sample_file(names[i], k)) for i in idx])
                                   for k in range(k_draws)])
            on = (lambda t: None if t is None else t.to(device))
            metrics.update(on(samples), on(y), on(x), index=torch.tensor(idx), mask=on(mask))
            if problem is not None:
                raws.append(torch.stack([torch.stack([read_tensor_file(where[(i, k)][0] / raw_file(names[i], k))
                                                      for i in idx]) for k in range(k_draws)]))
                ys.append(y)
    values = metrics.compute()
    per_image = merge_per_image([[{**e, "name": names.get(int(e["index"]))} for e in metrics.per_image()]])
    result: dict[str, Any] = {"metrics": values, "notes": dict(metrics.notes), "per_image": per_image}
    if problem is not None:
        from msdiff.gaussian import joint_frechet_distance, posterior_error

        s, y = torch.cat(raws, dim=1), torch.cat(ys)
        exact: dict[str, Any] = {"draws": int(s.shape[0] * s.shape[1]), **posterior_error(s, y, problem)}
        if str(settings.get("source", "")).startswith("split"):  # conditions from the data's own distribution
            exact["joint_frechet"] = joint_frechet_distance(s.reshape(-1, *s.shape[2:]), y.repeat(s.shape[0], 1, 1, 1),
                                                            problem)
        result["gaussian"] = exact
    return result


def _read_sample(d: Path, rec: dict, rel: str) -> torch.Tensor:
    if rel not in rec["files"]:
        raise ValueError(f"{d / rel}: not in the manifest record of condition {rec['index']} draw {rec.get('draw')}")
    return read_image(d / rel)
