"""The usage lines in the headers of configs/*.yaml work as printed: each train.py line parses (the
config resolves with its overrides, nothing is built) and each sample.py line parses, names an
output, and reads the checkpoint the config's own train.py line writes."""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import CONFIGS

USAGE = re.compile(r"^#\s+(python \S+\.py .*?)(?:\s{2,}#.*)?$")


def usage_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            m = USAGE.match(line)
            if m and re.search(r"\b(train|sample)\.py\b", m.group(1)):
                found.append((path.name, shlex.split(m.group(1))))
    return found


LINES = usage_lines()


def test_every_fmnist_config_shows_how_to_train_and_sample():
    names = {name for name, cmd in LINES if cmd[1] == "sample.py"}
    assert {p.name for p in CONFIGS.glob("fmnist_*.yaml")} <= names
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {name for name, _ in LINES}


@pytest.mark.parametrize("name, command", LINES, ids=[f"{n}:{c[1]}" for n, c in LINES])
def test_a_header_usage_line_parses(name, command):
    import sample
    import train

    assert command[0] == "python" and command[1] in ("train.py", "sample.py"), command
    args = command[2:]
    if command[1] == "train.py":
        config = args[args.index("--config") + 1]
        rest = args[:args.index("--config")] + args[args.index("--config") + 2:]
        assert config == name, f"{name}: its usage line trains {config}"
        train.resolved_config(config, *rest)
        return
    _, parsed = sample.parse(args)
    assert parsed.output_dir or parsed.export, f"{name}: {shlex.join(command)} names no --output_dir"
    assert parsed.ckpt_path == f"runs/{name.removesuffix('.yaml')}/checkpoints/last.ckpt"
