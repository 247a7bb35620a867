"""Shared helpers of the entry points (train.py, sample.py).

* :func:`resolve_config_argv`: ``--config sr8x_cmde.yaml`` (or ``sr8x_cmde``) names a file in
  ``configs/`` when no such path exists; ``sys.argv`` itself is rewritten (not passed as ``args=``)
  because a DDP launcher re-runs ``sys.argv`` on the other ranks.
* :func:`run_entry_point`: runs ``main()`` and turns user errors (bad config keys and types, missing
  files, bad values, a non-finite loss) into ONE last line on stderr and exit status
  :data:`USER_ERROR_EXIT_CODE`, environment errors (disk full, read-only file system, permission
  denied, I/O error) into one line naming the path and :data:`ENVIRONMENT_ERROR_EXIT_CODE`, and
  Ctrl-C into :data:`INTERRUPTED_EXIT_CODE`, all without a traceback. A data-loader worker killed from
  outside (the out-of-memory killer) is an environment error too. Programming errors keep theirs.

Exit statuses of train.py and sample.py: 0 done, 2 user error, 74 environment error, 75 preempted
(train.py: ``last.ckpt`` saved, SLURM job requeued), 130 interrupted.
"""
from __future__ import annotations

import errno
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USER_ERROR_EXIT_CODE = 2
#: EX_IOERR of sysexits.h: the machine, not the command, is at fault (a rerun after freeing space works)
ENVIRONMENT_ERROR_EXIT_CODE = 74
INTERRUPTED_EXIT_CODE = 130
#: errno values of an OSError that are the environment's fault, not the command's
ENVIRONMENT_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO",
                                                             "EFBIG", "EMFILE", "ENFILE") if hasattr(errno, n))


#: errno values of an OSError about a path the user named (a name too long, a file where a folder is
#: expected, ...): a user error naming the path
PATH_ERRNOS = frozenset(getattr(errno, n) for n in ("ENAMETOOLONG", "ENOTDIR", "EISDIR", "EEXIST", "ELOOP")
                        if hasattr(errno, n))


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The experiment configs shipped in ``configs/`` (top level only; sub-folders hold pieces)."""
    return sorted(p.name for p in Path(config_dir).glob("*.yaml"))


def _resolve_one(value: str, config_dir: Path) -> str:
    if Path(value).is_file():
        _check_config_file(value)
        return value
    for cand in (Path(config_dir) / value, Path(config_dir) / f"{value}.yaml"):
        if cand.is_file():
            return str(cand)
    names = ", ".join(Path(n).stem for n in available_configs(config_dir))
    raise ValueError(f"--config {value}: no such file; expected a YAML path or an experiment in "
                     f"{config_dir}: {names}")


def _check_config_file(path: str) -> None:
    """ValueError naming a --config file that is not valid YAML, too large or too deeply aliased, gives
    a key twice (``msdiff.config_file``), is empty or is not a mapping of keys (jsonargparse only says
    "Unexpected config")."""
    from msdiff.config_file import load_config_file

    data = load_config_file(path, "--config")
    if data is None:
        raise ValueError(f"--config {path}: the file is empty; expected a YAML mapping of keys "
                         "(model:, data:, trainer:, ...)")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a YAML mapping of keys (model:, data:, ...), "
                         f"got a {type(data).__name__}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_config_argv(argv: Optional[list[str]] = None, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Rewrite every ``--config NAME`` / ``--config=NAME`` / ``-c NAME`` of ``argv`` (default and
    in place: ``sys.argv``) to a path, resolving bare names against ``config_dir``, and join
    ``--key -1e-3`` into ``--key=-1e-3`` (argparse reads a negative number in exponent notation as
    an option and blames the parent key)."""
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
        elif (a.startswith("--") and "=" not in a and i + 1 < len(args) and args[i + 1].startswith("-")
              and _is_number(args[i + 1])):
            args[i:i + 2] = [f"{a}={args[i + 1]}"]
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


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (``__cause__``/``__context__``)."""
    chain: list[BaseException] = []
    e: Optional[BaseException] = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def environment_error(exc: BaseException) -> Optional[OSError]:
    """The OSError of the environment (errno in ENVIRONMENT_ERRNOS) in ``exc``'s chain, or None."""
    return next((e for e in exception_chain(exc) if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS), None)


def interrupted_by_user(exc: BaseException) -> bool:
    """Whether ``exc`` comes from Ctrl-C: a KeyboardInterrupt in its chain (torch's zip writer turns one
    raised inside ``torch.save``, i.e. during a checkpoint write, into a RuntimeError "unexpected pos")."""
    return any(isinstance(e, KeyboardInterrupt) for e in exception_chain(exc))


def environment_error_line(e: OSError) -> str:
    """``cannot write PATH: REASON`` style line of an environment OSError."""
    reason = e.strerror or str(e)
    code = errno.errorcode.get(e.errno, e.errno)
    writes = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
    if e.filename is None:  # e.g. a buffered write flushed by a library's background thread
        return f"a {'write' if e.errno in writes else 'file operation'} failed: {reason} [errno {code}]"
    path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{'cannot write' if e.errno in writes else 'cannot use'} {path}: {reason} [errno {code}]"


#: torch's "DataLoader worker (pid 12) is killed by signal: Killed." / "(pid(s) 12, 13) exited unexpectedly"
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) "
                          r"(?:is killed by signal: ([\w ]+?)\.?\s*$|exited unexpectedly)")


def worker_died_line(exc: BaseException) -> Optional[str]:
    """One line for a data-loader worker killed from outside (the out-of-memory killer sends SIGKILL):
    torch raises a RuntimeError in the main process wherever it is; None for any other error."""
    for e in exception_chain(exc):
        m = _WORKER_DIED.search(str(e)) if isinstance(e, RuntimeError) else None
        if m is not None:
            signal_name = (m.group(2) or "").strip()
            how = f"was killed by signal {signal_name}" if signal_name else "exited unexpectedly"
            oom = " (out of memory?)" if signal_name in ("", "Killed") else ""
            return (f"a data-loader worker (pid {m.group(1).strip()}) {how}{oom}; the checkpoints "
                    "written before are intact: rerun the command to resume (fewer --data.init_args.num_workers "
                    "or a smaller batch needs less memory)")
    return None


def failing_key(config: Any, error: BaseException, prefix: str = "") -> Optional[str]:
    """The config key (``model.init_args.net``) of the deepest ``{class_path, init_args}`` entry of
    ``config`` (a resolved config as plain dicts) whose class, built alone from it
    (`msdiff.checkpoint_file.instantiate_config`), fails with the message of ``error``'s innermost
    exception: where a constructor's check came from, found by rebuilding, not by reading frames."""
    if not isinstance(config, dict):
        return None
    message = str(_root_cause(error)).strip()
    for key, value in config.items():
        if not isinstance(value, dict):
            continue
        node = "class_path" in value and isinstance(value.get("init_args", {}), dict)
        path = f"{prefix}{key}"
        deeper = failing_key(value.get("init_args", {}) if node else value, error, path + (".init_args." if node else "."))
        if deeper is not None:
            return deeper
        if node and _fails_with(value, message):
            return path
    return None


def import_class(class_path: str) -> Optional[type]:
    """The class a dotted ``class_path`` names, or None when it names no importable class."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def _fails_with(node: dict, message: str) -> bool:
    from msdiff.checkpoint_file import instantiate_config

    cls = import_class(str(node["class_path"]))
    if cls is None:
        return False
    try:
        instantiate_config(node, cls)
    except Exception as e:  # noqa: BLE001 - any failure with the same message is the culprit
        return str(_root_cause(e)).strip() == message
    return False


def _did_you_mean(class_path: str) -> str:
    """" (did you mean pkg.Name?)" for a class path whose module exists but has no such name."""
    import difflib
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        mod = importlib.import_module(module)
    except Exception:
        return ""
    names = [n for n in dir(mod) if not n.startswith("_") and isinstance(getattr(mod, n, None), type)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6) or [n for n in names if n.lower() == name.lower()]
    return f" (did you mean {', '.join(f'{module}.{n}' for n in close)}?)" if close else ""


_STRUCTURE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def jsonargparse_cause(text: str) -> Optional[str]:
    """``KEY.PATH: cause`` from jsonargparse's nested report ("Parser key ...", "Problem with given
    class_path ...", union alternatives): the first non-None alternative is followed to its deepest
    line; a missing class gets a "did you mean". None when the text is not such a report."""
    if "Parser key" not in text and "Problem with given class_path" not in text:
        return None
    parts: list[str] = []
    class_path, leaf = None, None
    skip_deeper: Optional[int] = None
    taken: set[int] = set()
    for raw in text.splitlines():
        indent, t = len(raw) - len(raw.lstrip()), raw.strip()
        if skip_deeper is not None:
            if indent > skip_deeper:
                continue
            skip_deeper = None
        if not t:
            continue
        if t.startswith("- "):
            if "NoneType" in t or indent in taken:
                skip_deeper = indent
                continue
            taken.add(indent)
            t = t[2:]
        if any(t.startswith(x) for x in _STRUCTURE):
            continue
        m = re.match(r'Parser key "([^"]+)":?\s*(.*)$', t)
        if m:
            parts.append(m.group(1))
            t = m.group(2)
            if not t:
                continue
        m = re.match(r"Problem with given class_path '([^']+)':?\s*(.*)$", t)
        if m:
            class_path = m.group(1)
            if parts and parts[-1] != "init_args":
                parts.append("init_args")
            t = m.group(2)
            if not t:
                continue
        leaf = t
    if leaf is None:
        return None
    while parts and parts[-1] == "init_args":
        parts.pop()
    key = ".".join(parts)
    line = f"{key}: {leaf}" if key else leaf
    if class_path and class_path not in leaf:
        line += f" (class_path {class_path})"
    if class_path and ("has no attribute" in leaf or "No module named" in leaf or "not found" in leaf):
        line += _did_you_mean(class_path)
    return line


def subclass_names(base: type) -> list[str]:
    """Names of the imported concrete choices of a class argument: the public subclasses of `base`
    (at any depth) that have no subclasses of their own, sorted."""
    seen, stack = {}, list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if not cls.__name__.startswith("_"):
            seen.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return sorted(name for name, cls in seen.items() if not cls.__subclasses__())


def class_choice_error(argv: Sequence[str], bases: dict[str, type]) -> Optional[str]:
    """One line for a command line ``argv`` that names, for one of the class arguments ``bases``
    ({key: base type}), a class that is not one of its choices (``--sampler Hune``), or gives
    ``--KEY.ARG`` before any ``--KEY CLASS`` (without --config, which may name the class); None when
    every class argument is fine. Checked on the command line itself, before jsonargparse parses it
    (a JSON value is left to jsonargparse)."""
    given: set[str] = set()
    from_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in argv)
    for i, arg in enumerate(argv):
        for key, base in bases.items():
            flag = f"--{key}"
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.partition("=")[2]
            elif arg.startswith(flag + ".") and key not in given and not from_config and arg != f"{flag}.help":
                return (f"{arg.partition('=')[0]}: no {flag} class given before it; expected {flag} CLASS "
                        f"(one of {', '.join(subclass_names(base))}) first")
            else:
                continue
            given.add(key)
            if not value.lstrip().startswith("{") and not _is_choice(value, base):
                return (f"{flag} {value}: unknown; expected one of {', '.join(subclass_names(base))} "
                        f"(a {base.__name__} class name or class path)")
    return None


def _is_choice(value: str, base: type) -> bool:
    """Whether ``value`` names a concrete choice of ``base``: one of `subclass_names` or the dotted
    path of an importable subclass."""
    if value in subclass_names(base):
        return True
    cls = import_class(value)
    return cls is not None and issubclass(cls, base)


def user_error_line(exc: BaseException) -> str:
    """One line for a user error. Errors re-raised from DataLoader workers carry the worker's
    traceback in their message: keep only its last line (the original error)."""
    from argparse import ArgumentError  # jsonargparse's errors are argparse's

    root = _root_cause(exc)
    if (root is not exc and not isinstance(exc, ArgumentError) and isinstance(root, _user_exception_types())
            and len(str(root).strip().splitlines()) == 1):
        # not a parse error (jsonargparse raises those as ArgumentError) but an error wrapped on its way
        # up (by jsonargparse's instantiation, Lightning, a DataLoader): the innermost one of Python's
        # exception chain, a constructor's own check, whose message names the argument and the value
        return f"{type(root).__name__}: {str(root).strip()}"
    text = str(exc).strip()
    cause = jsonargparse_cause(text)
    if cause is not None:
        return f"{type(exc).__name__}: {cause}"
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


def _close_progress_bars() -> None:
    """End any open tqdm bar's line, so that the error line is a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    bar_class = getattr(tqdm_module, "tqdm", None)
    for bar in list(getattr(bar_class, "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # a broken bar must not hide the error
            pass


def _report(prog: str, line: str, code: int) -> None:
    _close_progress_bars()
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"{prog}: {line}", file=sys.stderr)
    sys.exit(code)


def _quiet_background_errors(errors: list) -> Callable[[], None]:
    """Install hooks that record, instead of printing a traceback, (a) the environment errors of
    background threads ("Exception in thread": e.g. TensorBoard's event writer on a full disk, which
    re-raises them in the main thread) and (b) a killed data-loader worker's error raised where
    Python can only print it ("Exception ignored in": torch's SIGCHLD handler fires anywhere; the
    data loader raises it again in the main thread). Other errors go to the hooks installed before.
    Returns the function that restores those hooks."""
    import threading

    previous_thread, previous_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args) -> None:
        if args.exc_value is not None and environment_error(args.exc_value) is not None:
            errors.append(args.exc_value)
            return
        previous_thread(args)

    def unraisable_hook(args) -> None:
        if args.exc_value is not None and worker_died_line(args.exc_value) is not None:
            return
        previous_unraisable(args)

    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook

    def restore() -> None:
        threading.excepthook, sys.unraisablehook = previous_thread, previous_unraisable

    return restore


def run_entry_point(main: Callable[[], Optional[int]], prog: Optional[str] = None) -> None:
    """``sys.exit(main())``, with user errors reported as one last line ``<prog>: error: ...``."""
    prog = prog or Path(sys.argv[0]).name
    thread_errors: list[BaseException] = []
    restore_hooks = _quiet_background_errors(thread_errors)
    try:
        code = main()
        if not code and thread_errors:  # a background writer failed and the main thread never heard of it
            raise thread_errors[0]
    except KeyboardInterrupt:
        _report(prog, "interrupted", INTERRUPTED_EXIT_CODE)
    except Exception as e:
        if interrupted_by_user(e):
            _report(prog, "interrupted", INTERRUPTED_EXIT_CODE)
        env = environment_error(e)
        if env is not None:
            _report(prog, f"error: {environment_error_line(env)}", ENVIRONMENT_ERROR_EXIT_CODE)
        path_error = next((x for x in exception_chain(e) if isinstance(x, OSError) and x.errno in PATH_ERRNOS
                           and x.filename is not None), None)
        if path_error is not None:  # a path the user named that cannot be a file or folder here
            _report(prog, f"error: {path_error.filename}: {path_error.strerror} "
                          f"[errno {errno.errorcode.get(path_error.errno, path_error.errno)}]", USER_ERROR_EXIT_CODE)
        died = worker_died_line(e)
        if died is not None:  # the machine took the process's memory: an environment error
            _report(prog, f"error: {died}", ENVIRONMENT_ERROR_EXIT_CODE)
        if not isinstance(e, _user_exception_types()):
            raise
        _report(prog, f"error: {user_error_line(e)}", USER_ERROR_EXIT_CODE)
    finally:
        restore_hooks()
    sys.exit(code or 0)
