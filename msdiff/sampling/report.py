"""sample.py's report (layer 2): metrics.json and metrics.md, and the provenance they carry.

`write_report(result, out)` writes both files atomically and returns the markdown table (what
sample.py prints). `software_version()` is msdiff's version and, in a git checkout, its commit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["software_version", "write_report"]


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


def write_report(result: dict, out: Path) -> str:
    """Write out/metrics.json and out/metrics.md; return the markdown (also what sample.py prints).

    result: {"metrics": {name: float | None}, "notes": {name: why None}, "settings": {...},
    optionally "gaussian": {name: float} (exact Gaussian-field evaluation), "config" (the sampler and
    guidance blocks that reproduce the run), "checkpoint", "software", "per_image" (written to
    metrics.json only)}."""
    import json

    metrics, notes = result["metrics"], result.get("notes", {})
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | unavailable: {notes.get(k, 'n/a')} |")
    for k, v in (result.get("gaussian") or {}).items():
        lines.append(f"| gaussian {k} (exact) | {v:.4f} |" if isinstance(v, float) else f"| gaussian {k} | {v} |")
    s = result["settings"]
    guided = f", guidance {s['guidance']}" if s.get("guidance") else ""
    step = (result.get("checkpoint") or {}).get("global_step")
    at = f" (step {step})" if step is not None else ""
    head = (f"# {s['ckpt_path']}{at}: {s['num_images']} conditions x {s['draws']} draws, sampler {s['sampler']}{guided} "
            f"({s['nfe_per_sample']} network evaluations per sample), seed {s['seed']}, {s['seconds']} s\n\n")
    text = head + "\n".join(lines) + "\n"
    from msdiff.atomic_io import atomic_write  # never a half-written report

    atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(result, indent=2, default=str).encode()))
    atomic_write(out / "metrics.md", lambda f: f.write(text.encode()))
    return text
