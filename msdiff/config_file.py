"""YAML config files, bounded and strict (train.py's and sample.py's ``--config``, the pieces a config
names, the run's recorded ``config.yaml``).

A YAML file is a small program: an alias bomb of 4 KB (each level a list of nine aliases of the
level below) describes 10^8 values, which jsonargparse expands (gigabytes, minutes, a process that
cannot be stopped while it does); a key written twice silently keeps the last value. Before any
YAML text is turned into values, :func:`check_yaml_text` refuses, in one line naming the source,
line and key:

* text over :data:`MAX_CONFIG_BYTES` (a config is a few KB);
* more than :data:`MAX_CONFIG_NODES` values once aliases are expanded (counted on the composed
  node graph, where an alias is a second reference to one node: the count costs one visit per
  distinct node), or nesting deeper than :data:`MAX_CONFIG_DEPTH`;
* a mapping key given twice (``<<`` merge keys are allowed; the merged mapping's own keys win, as
  YAML says);
* text that is not valid YAML (line and column of the error).

:func:`install_yaml_loader` puts the check in front of jsonargparse's YAML loader, so every config
file and piece the parsers read goes through it; :func:`load_config_file` reads one file with it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import yaml

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 64


class ConfigFileError(ValueError):
    """A config file (or YAML text) refused: one line naming the source and what was expected."""


class NotYAMLError(ConfigFileError):
    """The text is not valid YAML (line and column of the error)."""


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _expanded_size(node: yaml.Node, source: str, memo: dict[int, int], depth: int, key_path: str = "") -> int:
    """Number of values ``node`` stands for with every alias expanded (memoized per node)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigFileError(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep ({_where(node)}); "
                              "expected a config of keys and values")
    memo[id(node)] = 1  # a node reached again while being counted (a recursive alias) counts once
    size = 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Node] = {}
        for key, value in node.value:
            scalar = isinstance(key, yaml.ScalarNode)
            dotted = (f"{key_path}.{key.value}" if key_path else key.value) if scalar else key_path
            if scalar and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise ConfigFileError(f"{source}: key '{dotted}' given twice ({_where(seen[key.value])} and "
                                          f"{_where(key)}); expected each key once")
                seen[key.value] = key
            size += (_expanded_size(key, source, memo, depth + 1)
                     + _expanded_size(value, source, memo, depth + 1, dotted))
            if size > MAX_CONFIG_NODES:
                break
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, source, memo, depth + 1, key_path)
            if size > MAX_CONFIG_NODES:
                break
    if size > MAX_CONFIG_NODES:
        raise ConfigFileError(f"{source}: expands to more than {MAX_CONFIG_NODES:,} values (aliases expanded, "
                              f"{_where(node)}); expected a config of at most that size")
    memo[id(node)] = size
    return size


def check_yaml_text(text: str, source: str = "YAML text") -> None:
    """ConfigFileError naming ``source`` unless ``text`` is valid YAML of bounded size and expansion
    with no key given twice (see the module docstring)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigFileError(f"{source}: {len(text):,} characters; expected a config of at most "
                              f"{MAX_CONFIG_BYTES:,}")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise NotYAMLError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigFileError(f"{source}: nested too deeply; expected a config of keys and values") from None
    if node is not None:
        _expanded_size(node, source, {}, 0)


def load_config_file(path: str | os.PathLike, what: str = "") -> Any:
    """The values of the YAML file ``path`` after :func:`check_yaml_text` (``what`` prefixes the
    file's name in errors, e.g. "--config"); ConfigFileError for a file that is not UTF-8 text."""
    path = Path(path)
    source = f"{what} {path}".strip()
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"{source}: not a text (YAML) file") from None
    check_yaml_text(text, source)
    return yaml.safe_load(text)


def checked_loader(load: Callable[[str], Any]) -> Callable[[str], Any]:
    """``load`` (a YAML text -> values function) behind :func:`check_yaml_text`."""

    def load_checked(text: str, path: str | os.PathLike = "") -> Any:
        if isinstance(text, str) and (path or "\n" in text or "&" in text or len(text) > 256):  # not a flag value
            path = path or _piece_being_read()
            first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
            try:
                check_yaml_text(text, str(path) if path else f"config text starting '{first[:40]}'")
            except NotYAMLError:
                if path:  # a file: name it
                    raise
                # a value, not a file: it may be plain text (jsonargparse's YAMLError tells it so)
        return load(text)

    load_checked.msdiff_checked = True  # type: ignore[attr-defined]
    return load_checked


def _piece_being_read() -> str:
    """The config piece jsonargparse is reading (its stack of files being loaded), or ""."""
    try:
        from jsonargparse._util import config_load_stack  # private; without it errors name no file
    except ImportError:  # pragma: no cover
        return ""
    stack = config_load_stack.get()
    return str(stack[-1][0]) if stack else ""


def install_yaml_loader() -> None:
    """Put :func:`check_yaml_text` in front of jsonargparse's YAML loader (once per process)."""
    import jsonargparse

    current = jsonargparse.get_loader("yaml")
    if not getattr(current, "msdiff_checked", False):
        jsonargparse.set_loader("yaml", checked_loader(current), exceptions=(yaml.YAMLError,))
