#!/usr/bin/env python
"""Print every shipped experiment's effective config (what ``train.py --config NAME --print_config``
resolves: defaults filled in, pieces and links applied) as one JSON object, flattened to dotted
keys: ``{"sr8x_cmde": {"model.init_args.lr": 0.0002, ...}, ...}``.

    python scripts/dump_configs.py > resolved.json            # all of configs/*.yaml
    python scripts/dump_configs.py sr8x_cmde inpaint_vscmde    # some

tests/data/config_reference.json was written by this script at commit 961b691 (before the configs
were composed from shared pieces; it then read ``--print_config``'s output, which equals
``train.resolved_config``); tests/test_configs_equivalence.py compares against it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flatten(value, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if isinstance(value, dict) and value:
        out: dict = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def main(names: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    import train

    names = names or sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    lines = [f"{json.dumps(n)}: {json.dumps(flatten(train.resolved_config(n)), sort_keys=True)}" for n in names]
    print("{\n" + ",\n".join(lines) + "\n}")


if __name__ == "__main__":
    main(sys.argv[1:])
