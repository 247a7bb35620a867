"""Shared helpers of the entry points (train.py, sample.py).

* :func:`resolve_config_argv`: ``--config sr8x_cmde.yaml`` (or ``sr8x_cmde``) names a file in
  ``configs/`` when no such path exists; ``sys.argv`` itself is rewritten (not passed as ``args=``)
  because a DDP launcher re-runs ``sys.argv`` on the other ranks.
* :func:`run_entry_point`: runs ``main()`` and turns user errors (bad config keys and types, missing
  files, bad values, a non-finite loss) into ONE last line on stderr and exit status
  :data:`USER_ERROR_EXIT_CODE`, environment errors (disk full, read-only file system, permission
  denied, I/O error) into one line naming the path and :data:`ENVIRONMENT_ERROR_EXIT_CODE`, and
  Ctrl-C into :data:`INTERRUPTED_EXIT_CODE`, all without a traceback. Programming errors keep theirs.

Exit statuses of train.py and sample.py: 0 done, 2 user error, 74 environment error, 75 preempted
(train.py: ``last.ckpt`` saved, SLURM job requeued), 130 interrupted.
"""
from __future__ import annotations

import errno
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USER_ERROR_EXIT_CODE = 2
#: EX_IOERR of sysexits.h: the machine, not the command, is at fault (a rerun after freeing space works)
ENVIRONMENT_ERROR_EXIT_CODE = 74
INTERRUPTED_EXIT_CODE = 130
#: errno values of an OSError that are the environment's fault, not the command's
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                                             "EFBIG", "EMFILE", "ENFILE") if hasattr(errno, n))


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The experiment configs shipped in ``configs/`` (top level only; sub-folders hold pieces)."""
    return sorted(p.name for p in Path(config_dir).glob("*.yaml"))


def _resolve_one(value: str, config_dir: Path) -> str:
    if Path(value).is_file():
        return value
    for cand in (Path(config_dir) / value, Path(config_dir) / f"{value}.yaml"):
        if cand.is_file():
            return str(cand)
    names = ", ".join(Path(n).stem for n in available_configs(config_dir))
    raise ValueError(f"--config {value}: no such file; expected a YAML path or an experiment in "
                     f"{config_dir}: {names}")


def resolve_config_argv(argv: Optional[list[str]] = None, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Rewrite every ``--config NAME`` / ``--config=NAME`` / ``-c NAME`` of ``argv`` (default and
    in place: ``sys.argv``) to a path, resolving bare names against ``config_dir``."""
    args = sys.argv if argv is None else argv
    i = 1
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c") and i + 1 < len(args):
            args[i + 1] = _resolve_one(args[i + 1], config_dir)
            i += 2
            continue
        if a.startswith("--config="):
            args[i] = "--config=" + _resolve_one(a.split("=", 1)[1], config_dir)
        i += 1
    return args


def experiment_name(argv: Sequence[str]) -> Optional[str]:
    """The stem of the first ``--config`` file in ``argv`` (the run's default name)."""
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            return Path(argv[i + 1]).stem
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1]).stem
    return None


def _user_exception_types() -> tuple[type, ...]:
    types: list[type] = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                         PermissionError, FloatingPointError]
    try:
        from jsonargparse import ArgumentError
        types.append(ArgumentError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
        types.append(MisconfigurationException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _next_in_chain(exc: BaseException) -> Optional[BaseException]:
    """``raise X from Y`` -> Y; an implicit context unless ``raise ... from None`` suppressed it."""
    if exc.__cause__ is not None:
        return exc.__cause__
    return None if exc.__suppress_context__ else exc.__context__


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of the `raise ... from` / implicit context chain (``from None`` ends it:
    its message was written to replace the inner one, e.g. to name the file)."""
    seen = {id(exc)}
    while (nxt := _next_in_chain(exc)) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def environment_error(exc: BaseException) -> Optional[OSError]:
    """The OSError of the environment (errno in ENVIRONMENT_ERRNOS) in ``exc``'s chain, or None."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def environment_error_line(e: OSError) -> str:
    """``cannot write PATH: REASON`` style line of an environment OSError."""
    reason = e.strerror or str(e)
    path = e.filename if e.filename is not None else "?"
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    verb = {errno.ENOSPC: "cannot write", errno.EROFS: "cannot write", errno.EFBIG: "cannot write"}.get(e.errno, "cannot use")
    if getattr(errno, "EDQUOT", None) == e.errno:
        verb = "cannot write"
    return f"{verb} {path}: {reason} [errno {errno.errorcode.get(e.errno, e.errno)}]"


def _raised_by_jsonargparse(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "jsonargparse" in tb.tb_frame.f_code.co_filename


def user_error_line(exc: BaseException) -> str:
    """One line for a user error. Errors re-raised from DataLoader workers carry the worker's
    traceback in their message: keep only its last line (the original error)."""
    root = _root_cause(exc)
    if (root is not exc and isinstance(root, _user_exception_types()) and not _raised_by_jsonargparse(root)
            and len(str(root).strip().splitlines()) == 1):
        return f"{type(root).__name__}: {str(root).strip()}"   # e.g. a constructor's check, wrapped by jsonargparse
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("Given value")]
    if "Original Traceback" in text and lines:
        return lines[-1]
    if len(lines) > 3:  # jsonargparse's nested report: its first line plus the most specific cause
        keys = ("is not accepted", "does not accept", "unrecognized", "expected a", "not a valid", "no such", "not a")
        causes = [ln.lstrip("- ") for ln in lines[1:] if any(k in ln.lower() for k in keys) and "NoneType" not in ln]
        bullets = [ln.lstrip("- ") for ln in lines[1:] if ln.startswith("- ") and "NoneType" not in ln]
        line = f"{lines[0].rstrip(':')}: {(causes or bullets or lines[-1:])[0]}"
        nested = re.search(r"NestedArg\(key='([^']+)', val='([^']*)'\)", text)
        if nested:
            line += f" (for {nested.group(1)}={nested.group(2)})"
    else:
        line = " ".join(lines)
    return f"{type(exc).__name__}: {line}" if not line.startswith(type(exc).__name__) else line


def run_entry_point(main: Callable[[], Optional[int]], prog: Optional[str] = None) -> None:
    """``sys.exit(main())``, with user errors reported as one last line ``<prog>: error: ...``."""
    prog = prog or Path(sys.argv[0]).name
    try:
        code = main()
    except KeyboardInterrupt:
        sys.stderr.flush()
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as e:
        env = environment_error(e)
        if env is not None:
            sys.stderr.flush()
            print(f"{prog}: error: {environment_error_line(env)}", file=sys.stderr)
            sys.exit(ENVIRONMENT_ERROR_EXIT_CODE)
        if not isinstance(e, _user_exception_types()):
            raise
        sys.stderr.flush()
        print(f"{prog}: error: {user_error_line(e)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    sys.exit(code or 0)
