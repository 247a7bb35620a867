"""sample.py on a cluster (issue 24): stopped by signals, continued by the same command, sharded,
evaluated from the files, with the same PNGs and metrics bit for bit whatever happened in between.

The subprocess tests are few and small (the tiny checkpoint of tests/conftest.py, 4 conditions);
the rest runs sample.py in-process or calls its modules."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sample  # noqa: E402  (conftest puts the repository on sys.path)
from conftest import run_sample as run
from conftest import sample_pngs as pngs

ROOT = Path(__file__).resolve().parents[1]
#: 4 conditions in fixed batches of 2, 2 draws, 59 network evaluations per sample (a few seconds)
COMMON = ["--num_images", "4", "--batch_size", "2", "--draws", "2", "--sampler", "Heun", "--sampler.steps", "30"]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / "samples").glob("*.png"))}


def _metrics(d: Path) -> tuple[dict, list]:
    r = json.loads((d / "metrics.json").read_text())
    return r["metrics"], r["per_image"]


def _draw_lines(d: Path) -> int:
    logs = list((d / "manifest").glob("*.jsonl")) if (d / "manifest").is_dir() else []
    return sum(p.read_text().count('"draw":') - p.read_text().count('"draw":null') for p in logs)


def _start(spawn, ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return spawn([sys.executable, ROOT / "sample.py", "--ckpt_path", ckpt, "--output_dir", out, *COMMON, "--device",
                  "cpu", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_after_first_sample(proc: subprocess.Popen, out: Path, sig: int, group: bool = False) -> tuple[int, str]:
    start = _draw_lines(out)
    deadline = time.monotonic() + 120
    while _draw_lines(out) == start and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_stopped_by_every_signal_then_continued_gives_the_same_bits(tiny_score_checkpoint, tmp_path, spawn):
    """SIGTERM (exit 75, one line), SIGKILL and Ctrl-C (exit 130, one line) in turn, then the same
    command with --devices 2 finishes the run: the PNGs and metrics equal an uninterrupted run's
    bit for bit, and no sample finished before a stop was redone."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    run("--ckpt_path", tiny_score_checkpoint, "--output_dir", ref, *COMMON)

    code, err = _signal_after_first_sample(_start(spawn, tiny_score_checkpoint, out), out, signal.SIGTERM)
    assert code == 75, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("sample.py: stopped by a preemption signal; every finished sample "
                                                   f"is kept in {out}: rerun the same command")
    kept = _files(out)
    assert kept and all(ref_bytes == kept[n] for n, ref_bytes in _files(ref).items() if n in kept)
    stamps = {n: (out / "samples" / n).stat().st_mtime_ns for n in kept}

    code, _ = _signal_after_first_sample(_start(spawn, tiny_score_checkpoint, out), out, signal.SIGKILL, group=True)
    assert code == -signal.SIGKILL
    code, err = _signal_after_first_sample(_start(spawn, tiny_score_checkpoint, out), out, signal.SIGINT, group=True)
    assert code == 130 and err.strip().splitlines()[-1] == "sample.py: interrupted", err[-2000:]

    proc = _start(spawn, tiny_score_checkpoint, out, "--devices", "2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "samples already on disk are kept" in err                    # the finished ones were not sampled again
    assert _files(out) == _files(ref)                                   # the same PNG bytes
    assert _metrics(out) == _metrics(ref)                               # the same metrics, bit for bit
    assert {n: (out / "samples" / n).stat().st_mtime_ns for n in kept} == stamps  # nothing finished was redone
    assert not list(out.rglob(".*.tmp"))                                # no temporaries of the SIGKILL left
    for noise in ("GPU available", "TPU available", "Tip:", "Warning", "warn", "LeafSpec"):
        assert noise not in err                                         # as quiet as train.py


def test_damaged_samples_are_redone_and_shards_evaluate_together(tiny_score_checkpoint, tmp_path, capsys):
    """A truncated and a missing sample are redone on the rerun (the manifest's digests); two
    --shard jobs into two directories, evaluated together with --evaluate, give the unsharded run's
    metrics bit for bit; an incomplete set of directories is refused naming what is missing."""
    ref = tmp_path / "ref"
    common = ["--ckpt_path", tiny_score_checkpoint, *COMMON[:-1], "3"]
    run(*common, "--output_dir", ref)
    want = _files(ref)
    (ref / "samples" / "00001_draw1.png").write_bytes(want["00001_draw1.png"][:40])  # truncated
    (ref / "samples" / "00002_draw0.png").unlink()
    kept_stamp = (ref / "samples" / "00000_draw1.png").stat().st_mtime_ns  # same batch-draw as the truncated one
    capsys.readouterr()
    run(*common, "--output_dir", ref)
    assert "6 samples already on disk are kept" in capsys.readouterr().err   # 8 - the 2 damaged ones
    assert _files(ref) == want and (ref / "samples" / "00000_draw1.png").stat().st_mtime_ns == kept_stamp

    run(*common, "--output_dir", tmp_path / "s0", "--shard", "0/2")
    with pytest.raises(ValueError, match=r"--evaluate .*s0: 6 of 12 files of the run are missing or do not match the "
                                         r"manifest \(first: condition 2, its condition files\)"):
        run("--evaluate", tmp_path / "s0")
    run(*common, "--output_dir", tmp_path / "s1", "--shard", "1/2")
    assert sorted(pngs(tmp_path / "s0")) == ["00000_draw0.png", "00000_draw1.png", "00001_draw0.png", "00001_draw1.png"]
    run("--evaluate", tmp_path / "s0", tmp_path / "s1")
    assert _metrics(tmp_path / "s0") == _metrics(ref)
    with pytest.raises(ValueError, match=r"--evaluate .*ref: samples of other settings than .*s0 \(draws differ\)"):
        other = json.loads((ref / "manifest.json").read_text())
        other["settings"]["draws"] = 3
        (ref / "manifest.json").write_text(json.dumps(other))
        run("--evaluate", tmp_path / "s0", ref)
    for name in ("y/00000.png", "x/00000.png", "conditions/00000.pt"):  # for other tools, and the exact tensors
        assert (tmp_path / "s0" / name).is_file()


def test_command_line_conflicts_and_abbreviations_are_refused():
    with pytest.raises(ValueError, match=r"--guidance AGG replaces the sampler: --sampler and --steps would not be used"):
        sample.parse(["--ckpt_path", "c", "--guidance", "AGG", "--sampler", "Heun", "--steps", "3"])
    parser, args = sample.parse(["--ckpt_path", "c", "--guidance", "AGG"])
    assert args.sampler is None  # sample_config.yaml records no sampler that does not run
    with pytest.raises(Exception, match="unrecognized arguments: --num_image"):
        sample.parse(["--ckpt_path", "c", "--num_image", "3"])


def test_metrics_table_reads_as_a_table_with_each_reason_once():
    from msdiff.sampling.report import metrics_table, spread_over_conditions

    per_image = [{"psnr": [10.0, 12.0], "diversity": 3.0}, {"psnr": [14.0, 16.0], "diversity": 5.0}]
    assert spread_over_conditions(per_image, "psnr") == pytest.approx(2 ** 0.5 * 2)  # means 11, 15: std 2.83
    why = "Inception-v3 unavailable: weights not found"
    text = metrics_table({"metrics": {"psnr": 13.0, "ufid": None, "jfid": None, "diversity": 4.0},
                          "notes": {"ufid": why, "jfid": why}, "per_image": per_image,
                          "settings": {"ckpt_path": "c", "num_images": 2, "draws": 2, "sampler": "Heun",
                                       "nfe_per_sample": 5, "seed": 0, "seconds": 1.0}})
    assert "| psnr | 13.0000 | 2.8284 | higher | dB |" in text
    assert "| ufid | unavailable [1] | | lower |" in text and "| jfid | unavailable [1] |" in text
    assert "| diversity | 4.0000 | 1.4142 |" in text
    assert text.count(why) == 1 and text.endswith(f"[1] {why}\n")


def test_manifest_counts_only_intact_files_of_the_same_settings_and_has_one_writer(tmp_path):
    from msdiff.sampling.layout import write_files
    from msdiff.sampling.manifest import ManifestLog, finished_units

    digests = write_files(tmp_path, {"samples/a_draw0.png": b"abc", "samples/b_draw0.png": b"def"})
    with ManifestLog(tmp_path, "shard0of1-rank0") as log:
        log.append([{"index": 0, "draw": 0, "settings": "S", "files": {"samples/a_draw0.png": digests["samples/a_draw0.png"]}},
                    {"index": 1, "draw": 0, "settings": "T", "files": {"samples/b_draw0.png": digests["samples/b_draw0.png"]}}])
        with pytest.raises(ValueError, match=r"shard0of1-rank0.jsonl: in use by another sample.py process"):
            ManifestLog(tmp_path, "shard0of1-rank0")
    with open(tmp_path / "manifest" / "shard0of1-rank0.jsonl", "a") as f:
        f.write('{"index": 2, "draw": 0, "settings": "S", "fi')  # a line cut by a kill
    with ManifestLog(tmp_path, "shard0of1-rank0") as log:  # the next record starts on a line of its own
        log.append([{"index": 3, "draw": None, "settings": "S", "files": {"samples/b_draw0.png": "0" * 64}}])
    assert list(finished_units(tmp_path, "S")) == [(0, 0)]  # other settings, a cut line, a wrong digest: not done
    assert list(finished_units(tmp_path, "T")) == [(1, 0)]
    (tmp_path / "samples" / "a_draw0.png").write_bytes(b"abX")  # rewritten after it was recorded
    assert finished_units(tmp_path, "S") == {}
