"""sample.py's report (layer 2): metrics.json and metrics.md, and the provenance they carry.

`write_report(result, out)` writes both files atomically and returns the markdown table (what
sample.py prints): per metric its value, its spread over conditions, which direction is better and
its unit; the reason of an unavailable metric is written once below the table. `software_version()` is msdiff's version and, in a git checkout, its commit.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

__all__ = ["software_version", "metrics_table", "spread_over_conditions", "write_report"]


def software_version() -> dict[str, Any]:
    """{"msdiff": version, "git_commit": HEAD or None, "git_dirty": bool or None} of the msdiff
    source that runs (the commit only when msdiff is a git checkout and git is installed)."""
    import subprocess

    import msdiff

    root = Path(msdiff.__file__).resolve().parents[1]
    out: dict[str, Any] = {"msdiff": msdiff.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


#: metric -> (better: "higher" / "lower" / "", unit) for metrics.md
METRIC_INFO = {
    "psnr": ("higher", "dB"), "ssim": ("higher", "1"), "lpips": ("lower", "1"),
    "ufid": ("lower", "feature^2"), "jfid": ("lower", "feature^2"),
    "consistency": ("higher", "dB"), "diversity": ("higher = more varied draws", "grey levels (0-255)"),
    "ufid_pooled": ("lower", "feature^2"), "jfid_pooled": ("lower", "feature^2"),
}


def spread_over_conditions(per_image: list[dict], name: str) -> Optional[float]:
    """Standard deviation over conditions (ddof = 1) of each condition's mean over its draws of
    metric `name` (None when fewer than 2 conditions have a value)."""
    means = []
    for entry in per_image:
        v = entry.get(name)
        vals = [u for u in (v if isinstance(v, list) else [v]) if isinstance(u, (int, float))]
        if vals:
            means.append(sum(vals) / len(vals))
    if len(means) < 2:
        return None
    m = sum(means) / len(means)
    return math.sqrt(sum((u - m) ** 2 for u in means) / (len(means) - 1))


def metrics_table(result: dict) -> str:
    """The markdown of metrics.md: one row per metric (value, spread over conditions, direction,
    unit); each distinct reason for an unavailable metric is written once, below the table."""
    metrics, notes = result["metrics"], result.get("notes", {})
    per_image = result.get("per_image") or []
    reasons: list[str] = []
    lines = ["| metric | value | spread over conditions (std) | better | unit |", "|---|---|---|---|---|"]
    for k, v in metrics.items():
        better, unit = METRIC_INFO.get(k, ("", ""))
        if isinstance(v, float):
            spread = spread_over_conditions(per_image, k)
            lines.append(f"| {k} | {v:.4f} | {'' if spread is None else f'{spread:.4f}'} | {better} | {unit} |")
        else:
            why = notes.get(k, "not computed")
            if why not in reasons:
                reasons.append(why)
            lines.append(f"| {k} | unavailable [{reasons.index(why) + 1}] | | {better} | {unit} |")
    for k, v in (result.get("gaussian") or {}).items():
        lines.append(f"| gaussian {k} (exact) | {v:.4f} | | lower | 1 |" if isinstance(v, float)
                     else f"| gaussian {k} | {v} | | | |")
    s = result["settings"]
    guided = f", guidance {s['guidance']}" if s.get("guidance") else ""
    step = (result.get("checkpoint") or {}).get("global_step")
    at = f" (step {step})" if step is not None else ""
    seconds = f", {s['seconds']} s" if s.get("seconds") is not None else ""
    nfe = f" ({s['nfe_per_sample']} network evaluations per sample)" if s.get("nfe_per_sample") is not None else ""
    head = (f"# {s['ckpt_path']}{at}: {s['num_images']} conditions x {s['draws']} draws, sampler {s['sampler']}{guided}"
            f"{nfe}, seed {s['seed']}{seconds}\n\n")
    foot = "".join(f"\n[{j + 1}] {why}" for j, why in enumerate(reasons))
    return head + "\n".join(lines) + "\n" + foot + ("\n" if foot else "")


def write_report(result: dict, out: Path) -> str:
    """Write out/metrics.json and out/metrics.md; return the markdown (also what sample.py prints).

    result: {"metrics": {name: float | None}, "notes": {name: why None}, "settings": {...},
    optionally "gaussian": {name: float} (exact Gaussian-field evaluation), "config" (the sampler and
    guidance blocks that reproduce the run), "checkpoint", "software", "per_image" (written to
    metrics.json only)}."""
    import json

    from msdiff.atomic_io import atomic_write  # never a half-written report

    text = metrics_table(result)
    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(result, indent=2, default=str).encode()))
    atomic_write(out / "metrics.md", lambda f: f.write(text.encode()))
    return text
