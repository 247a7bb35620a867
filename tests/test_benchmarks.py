"""benchmarks/: a package run as `python -m benchmarks.<name>`. The one benchmark command runs in --quick
mode and rewrites only its own block of the results file, never the tracked one unless told
--update-results; the shared helpers measure what they claim (no timing assertions: shared machines)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks import common
from conftest import run_process
from msdiff.malloc import SETTINGS

ROOT = Path(__file__).resolve().parents[1]

OTHER = "## Data pipeline\n\nwritten by another script: keep me\n"


def test_replace_block_rewrites_only_its_block():
    text = "# Benchmark results\n\n" + OTHER
    once = common.replace_block(text, "x", "first")
    twice = common.replace_block(once, "x", "second")
    assert twice.count(common.begin_marker("x")) == 1 and "first" not in twice and "second" in twice
    assert twice.startswith("# Benchmark results\n") and twice.endswith(OTHER)
    assert common.read_block(twice, "x") == "second"
    with pytest.raises(ValueError, match="unbalanced"):
        common.replace_block(text + common.begin_marker("x"), "x", "y")


def test_peak_memory_in_subprocess_sees_the_allocation():
    res = common.peak_memory_in_subprocess("benchmarks.common:allocation_probe", {"mib": 64})
    assert res["mib"] == 64
    if res["kind"] == "peak RSS":
        assert 60 <= res["increase_mib"] <= 200, res
    assert res["peak_mib"] >= 60 and res["ru_maxrss_mib"] >= res["peak_mib"] - 1


@pytest.mark.slow
def test_run_quick_writes_every_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n" + OTHER)
    # --system-malloc (and no MALLOC_* settings inherited): the header must say so; one run checks both
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("MSDIFF_")}
    proc = run_process([sys.executable, "-m", "benchmarks.run", "--quick", "--system-malloc", "--output", out],
                       timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.endswith(OTHER) and text.count(common.begin_marker("benchmarks/run.py")) == 1
    block = common.read_block(text, "benchmarks/run.py")
    assert "## Summary (benchmarks/run.py)" in block and "torch " in block
    assert "CPU memory allocator: system defaults" in block
    for title in ("U-Net SR-160 training step", "Fused vs naive attention", "Data pipeline", "Samplers at 160x160",
                  "accuracy vs NFE", "trained checkpoint", "CUT and FastCUT"):
        assert f"### {title}" in block or any(title in line for line in block.splitlines() if line.startswith("###"))
    for row in ("| train | 1 |", "| forward | 2 |", "| CelebA 178x218 JPEG -> 160, SR 8x |", "| Heun 50 steps | 99 |",
                "| VE | PC steps=", "| VP | Heun steps=", "| FastCUT |"):
        assert row in block, row
    assert "Not run: pass `--ckpt PATH`" in block
    ran = block.split(common.begin_marker("benchmarks/run.py:gpu"))[0]  # gpu runs only with --only gpu
    assert "Not run yet" not in ran
    assert "nan" not in block.split("### Samplers at 160x160")[1].split("###")[0].replace("n/a", "")


def test_fresh_process_targets_resolve():
    """The "module:function" targets run.py's sections hand to fresh child processes exist."""
    for target in ("benchmarks.sections_unet:unet_setup", "benchmarks.sections_sampling:sampler_memory",
                   "benchmarks.cut_step:run_one"):
        assert callable(common._resolve(target)), target


@pytest.mark.slow
def test_gpu_section_reads_train_py_rate_from_event_times(tmp_path):
    """The gpu section's train.py measurement, in-process on CPU: its config of sr8x_cmde.yaml trains,
    and the steady-state rate is batch x (step span) / (wall span) of the logged train/loss events."""
    import yaml

    from benchmarks import sections_gpu
    from conftest import run_train

    cfg = sections_gpu.pipeline_config(True, batch=2, precision="32-true", workers=0, steps=5, device="cpu")
    assert cfg["trainer"]["max_steps"] == 5 and cfg["data"]["init_args"]["batch_size"] == 2
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_train(["--config", path, "--trainer.default_root_dir", tmp_path, "--name", "bench"]) == 0
    events = sections_gpu.loss_event_times(tmp_path / "bench")
    assert [s for s, _ in events] == [0, 1, 2, 3, 4]
    assert all(w1 >= w0 for (_, w0), (_, w1) in zip(events, events[1:]))


def test_gpu_block_rate_counts_images_per_second(monkeypatch):
    from benchmarks import sections_gpu

    clock = iter([10.0, 12.0, 20.0, 21.0, 30.0, 34.0])  # three blocks of 2 s, 1 s and 4 s
    monkeypatch.setattr(sections_gpu.time, "perf_counter", lambda: next(clock))
    calls = []
    rate = sections_gpu.block_rate(lambda: calls.append(1), images_per_step=8, steps=5, blocks=3, device="cpu")
    assert len(calls) == 15 and rate == 8 * 5 / 2.0  # the median block


def test_results_go_to_the_tracked_file_only_when_told(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "SCRATCH", tmp_path / "scratch")
    tracked = common.RESULTS.read_text()
    out = common.results_path(None, update=False)
    assert out == tmp_path / "scratch" / "RESULTS.md" and out.read_text() == tracked  # a copy: other blocks kept
    assert common.results_path(None, update=True) == common.RESULTS
    with pytest.raises(ValueError, match="add --update-results"):
        common.results_path(common.RESULTS, update=False)
    assert common.RESULTS.read_text() == tracked


def test_benchmarks_are_a_package_without_path_edits_or_name_tables():
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text and "sys.argv =" not in text and "SAMPLERS = {" not in text, path.name
