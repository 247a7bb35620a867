"""sample.py's output directory (layer 2): the rule for a non-empty --output_dir and the
writability check made after every input is read (nothing is written for bad input)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["OUTPUTS", "prepare_output_dir", "check_writable"]

OUTPUTS = ("samples", "grids", "translated", "metrics.json", "metrics.md", "sample_config.yaml")  # what sample.py writes in a run


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """The output-directory rule: a non-empty --output_dir is refused unless overwrite=True, which
    removes what an earlier sample.py run wrote there (OUTPUTS: samples/, grids/, translated/,
    metrics.json, metrics.md, sample_config.yaml) so that old and new samples never mix; other files are left alone."""
    import shutil

    from msdiff.user_paths import check_dir_path

    check_dir_path(out, "--output_dir")  # an existing file, a name longer than the file system allows
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--output_dir {out}: not empty ({shown}); choose a new directory or pass --overwrite "
                         "to replace an earlier sample.py run there")
    try:
        for name in OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    except OSError as e:
        from msdiff.cli import ENVIRONMENT_ERRNOS

        if e.errno in ENVIRONMENT_ERRNOS:  # read-only, permission: name the folder (rmtree names a bare file name)
            raise OSError(e.errno, e.strerror, str(p)) from None
        raise ValueError(f"--output_dir {out}: cannot remove the earlier run's {p.name} "
                         f"({e.strerror or type(e).__name__})") from None


def check_writable(out: Path) -> None:
    """Create out/samples and out/grids, or ValueError naming the directory."""
    try:
        for sub in ("samples", "grids"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        from msdiff.cli import ENVIRONMENT_ERRNOS

        if e.errno in ENVIRONMENT_ERRNOS:  # disk full, read-only, permission: an environment error naming the path
            raise OSError(e.errno, f"--output_dir not writable ({e.strerror})", e.filename or str(out)) from None
        raise ValueError(f"--output_dir {out}: not writable ({e.strerror or type(e).__name__})") from None
