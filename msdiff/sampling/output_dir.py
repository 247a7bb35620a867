"""sample.py's output directory (layer 2): the rule for a non-empty --output_dir and the
writability check made after every input is read (nothing is written for bad input).

An --output_dir holding a sampling run (its manifest.json, `msdiff.sampling.manifest`) with the
same settings is continued; with other settings it is refused with one line naming them. Any other
non-empty directory is refused. --overwrite removes an earlier run's outputs first."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from msdiff.sampling.manifest import read_settings, write_settings
from msdiff.sampling.plan import SamplingSettings

__all__ = ["OUTPUTS", "prepare_output_dir", "start_run", "check_writable"]

OUTPUTS = ("samples", "grids", "translated", "metrics.json", "metrics.md", "sample_config.yaml", "manifest.json",
           "manifest", "y", "x", "mask", "conditions", "raw", "task.pt")  # what sample.py writes in a run


def prepare_output_dir(out: Path, overwrite: bool, settings: Optional[SamplingSettings] = None) -> bool:
    """The output-directory rule (module doc), writing nothing but removals; True when an earlier run
    of the same `settings` is continued (else record them with `start_run` after `check_writable`). overwrite=True first removes what an earlier
    sample.py run wrote there (OUTPUTS) so that old and new samples never mix; other files are left alone."""
    import shutil

    from msdiff.user_paths import check_dir_path

    check_dir_path(out, "--output_dir")  # an existing file, a name longer than the file system allows
    if not out.is_dir():
        if out.exists():
            raise ValueError(f"--output_dir {out}: exists and is not a directory")
        return False
    entries = sorted(p.name for p in out.iterdir())
    recorded = read_settings(out) if settings is not None and not overwrite else None
    if recorded is not None:
        changed = settings.changed(recorded)
        if changed:
            raise ValueError(f"--output_dir {out}: holds samples of other settings ({'; '.join(changed)}); rerun with "
                             "the same settings to continue it, or choose a new directory, or pass --overwrite")
        return True
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--output_dir {out}: not empty ({shown}); choose a new directory or pass --overwrite "
                         "to replace an earlier sample.py run there")
    try:
        p = out
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
    return False


def start_run(out: Path, settings: SamplingSettings) -> None:
    """Record the settings of a new run in out/manifest.json."""
    write_settings(out, settings.as_dict())


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
