"""msdiff.malloc: the entry points re-execute once with glibc's caching settings (and only once)."""
import json
import os
import platform
import sys
from pathlib import Path

import pytest

from conftest import run_process

from msdiff.malloc import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
from msdiff.malloc import use_caching_malloc
use_caching_malloc()
print(json.dumps({{"pid": os.getpid(), "argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in {keys!r}}}}}))
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc settings")


def run(tmp_path, env_extra: dict) -> dict:
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT.format(root=str(ROOT), keys=list(SETTINGS)))
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("MSDIFF_")}
    proc = run_process([sys.executable, "-u", script, "--flag", "a b"], timeout=60, env={**env, **env_extra})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout        # printed once: one re-execution, no loop
    return json.loads(lines[0])


def test_reexecutes_once_with_the_settings_and_the_same_arguments(tmp_path):
    out = run(tmp_path, {})
    assert out["env"] == SETTINGS
    assert out["argv"] == ["--flag", "a b"]


def test_user_values_are_kept_and_opt_out_keeps_the_system_defaults(tmp_path):
    out = run(tmp_path, {"MALLOC_ARENA_MAX": "4"})
    assert out["env"] == {**SETTINGS, "MALLOC_ARENA_MAX": "4"}
    out = run(tmp_path, {"MSDIFF_SYSTEM_MALLOC": "1"})
    assert out["env"] == {k: None for k in SETTINGS}
