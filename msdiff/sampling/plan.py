"""What a sample.py run samples, and who samples it (plain Python, no torch).

A run draws K samples for each of the first N conditions. The conditions are cut into FIXED batches
of `batch_size` consecutive indices: batch b holds conditions bB, ..., min(bB + B, N) - 1, whatever
the number of devices, shards or interruptions. A network evaluation in float32 may round
differently when the rows beside a condition change (another batch size picks another kernel), so
the batch a condition is sampled in is part of what defines its samples: keeping the batches fixed
makes every sample's bits independent of `--devices`, `--shard` and of which batches an earlier,
interrupted run already finished. The unit of work is (batch, draw); noise is keyed by
(seed, condition, draw) (`msdiff.utils.example_noise`).

`--shard i/N` gives job i the batches b with b % N == i; within a job, process r of D devices
takes every D-th of the job's batches.

* `SamplingSettings`: the settings that define the samples (a frozen dataclass; `changed` names the
  keys in which two runs differ).
* `Shard.parse("i/N")`, `fixed_batches(n, batch_size)`, `share(batches, shard, rank, world)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["SamplingSettings", "Shard", "fixed_batches", "share"]


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides the bits of the samples of a run (recorded in manifest.json).

    checkpoint: the checkpoint's resolved path; step: its training step (None: not recorded);
    sampler / guidance: the {class_path, init_args} blocks that ran (sampler None under a guidance that
    replaces the sampler, e.g. AGG); conditions: N; draws: K; batch_size: B (fixed batches, module
    doc); seed; ema; source: where the conditions come from ("split test", "input DIR"); task: the
    --task override or None; device: "cpu" or "cuda" (the two round differently)."""

    checkpoint: str
    step: Optional[int]
    sampler: Optional[dict]
    guidance: Optional[dict]
    conditions: int
    draws: int
    batch_size: int
    seed: int
    ema: bool
    source: str
    task: Optional[str]
    device: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed(self, recorded: dict[str, Any]) -> list[str]:
        """"key recorded -> now" for every key whose value differs from `recorded` (an earlier run's
        `as_dict()`), in field order; unknown or missing keys count as changed."""
        now = self.as_dict()
        out = []
        for key in [*now, *(k for k in recorded if k not in now)]:
            if recorded.get(key, "<absent>") != now.get(key, "<absent>"):
                out.append(f"{key} {_short(recorded.get(key, '<absent>'))} -> {_short(now.get(key, '<absent>'))}")
        return out


def _short(value: Any) -> str:
    if isinstance(value, dict) and "class_path" in value:
        args = ", ".join(f"{k}={_short(v)}" for k, v in sorted((value.get("init_args") or {}).items()))
        return f"{str(value['class_path']).rpartition('.')[2]}({args})"
    return str(value)


@dataclass(frozen=True)
class Shard:
    """Job `index` of `count` (`--shard i/N`, 0 <= i < N)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: Optional[str]) -> "Shard":
        """"i/N" -> Shard(i, N); None -> the whole run; ValueError naming --shard otherwise."""
        if text is None:
            return cls()
        i, sep, n = str(text).partition("/")
        try:
            shard = cls(int(i), int(n)) if sep else None
        except ValueError:
            shard = None
        if shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard {text}: expected i/N with 0 <= i < N (e.g. 0/4 for the first of 4 jobs)")
        return shard

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """The run's batches: [[0, ..., B-1], [B, ..., 2B-1], ..., [..., n-1]] (module doc)."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected a positive integer")
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def share(n_batches: int, shard: Shard, rank: int = 0, world: int = 1) -> list[int]:
    """The batch numbers process `rank` of `world` samples in job `shard`: b % N == i, then every
    world-th of those starting at rank."""
    return list(range(shard.index, n_batches, shard.count))[rank::world]
