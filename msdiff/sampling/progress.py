"""Progress and planned cost of a sample.py process.

    progress = SamplingProgress(conditions, draws, nfe, units, world_size, device, shard, finished)
    progress.start_draw(batch, k, rows)   # before draw k of a fixed batch of `rows` conditions
    progress.step(rows)                   # from a forward pre-hook on the network: one evaluation
    line = progress.end_unit()            # after each (batch, draw); the first returns the time estimate
    progress.write(line)                  # a line of its own above the bar
    progress.close()

The planned-cost line is printed when the progress is created, before the bar exists, so it stands
on its own line. The bar counts network evaluations of this process's (batch, draw) units still to
do (a forward pass of the batch is one; a batched guidance pass of 2B rows counts 2, as
`Guidance.nfe` does), so it moves at every step of every draw and its ETA is the remaining
evaluations at the measured rate. With an adaptive sampler (probability-flow ODE) the number of
evaluations is not known in advance: the bar counts without a total.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Optional, TextIO

from msdiff.sampling.plan import Shard


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{seconds:.1f} s")


class SamplingProgress:
    """The planned-cost line, a tqdm bar over network evaluations and the time-estimate line.

    conditions: N (the whole run); draws: K; nfe: network evaluations per sample (None: adaptive);
    units: this process's (batch, draw) units still to sample; world_size: processes of this job;
    device: "cpu" or "cuda"; shard: this job's share; finished: samples of the share already on disk."""

    def __init__(self, conditions: int, draws: int, nfe: Optional[int], units: int, world_size: int,
                 device: str, shard: Shard = Shard(), finished: int = 0, file: TextIO = sys.stderr) -> None:
        from tqdm import tqdm

        self.conditions, self.draws, self.nfe, self.units = conditions, draws, nfe, units
        self.world_size, self.device, self.shard, self.finished, self.file = world_size, device, shard, finished, file
        print(self.plan_line(), file=file, flush=True)
        total = units * nfe if nfe is not None else None
        self.bar = tqdm(total=total, unit="eval", desc="sampling", dynamic_ncols=True, file=file, disable=units == 0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} evaluations "
                                   "[{elapsed}<{remaining}, {rate_fmt}]{postfix}" if total else None)
        self.done, self.batch, self.draw, self.in_draw, self.rows = 0, 0, 0, 0.0, 1
        self.t0 = time.perf_counter()
        self.first_unit_s: Optional[float] = None

    def plan_line(self) -> str:
        """What the run costs: N conditions x K draws x E evaluations, and this process's batched calls."""
        e = str(self.nfe) if self.nfe is not None else "an adaptive number of"
        per_sample = f" = {self.conditions * self.draws * self.nfe:,} sample-evaluations" if self.nfe else ""
        calls = f" = {self.units * self.nfe:,} batched network calls" if self.nfe else ""
        shard = f"; shard {self.shard} of the conditions" if self.shard.count > 1 else ""
        kept = f"; {self.finished} samples already on disk are kept" if self.finished else ""
        return (f"sample.py: planned {self.conditions} conditions x {self.draws} draws x {e} network evaluations"
                f"{per_sample}{shard}{kept}; on {self.world_size} {self.device} device(s), device 0 runs {self.units} "
                f"batch-draws{' x ' + str(self.nfe) if self.nfe else ''}{calls}; "
                "a time estimate follows the first batch-draw")

    def start_draw(self, batch: int, k: int, rows: int) -> None:
        self.batch, self.draw, self.in_draw, self.rows = batch, k, 0.0, max(int(rows), 1)
        self._postfix()

    def step(self, rows: Optional[int] = None) -> None:
        """One network forward pass of `rows` rows (None: the batch): rows / batch evaluations."""
        n = 1.0 if rows is None else rows / self.rows
        self.in_draw += n
        self.bar.update(n)
        self._postfix()

    def _postfix(self) -> None:
        of = f"/{self.nfe}" if self.nfe is not None else ""
        self.bar.set_postfix_str(f"batch {self.batch}, draw {self.draw + 1}/{self.draws}, "
                                 f"step {self.in_draw:.0f}{of}", refresh=False)

    def end_unit(self) -> Optional[str]:
        """Close a (batch, draw) unit; after the first, the line estimating this process's time."""
        self.done += 1
        if self.first_unit_s is not None:
            return None
        self.first_unit_s = time.perf_counter() - self.t0
        total = self.first_unit_s * self.units
        end = datetime.now(timezone.utc) + timedelta(seconds=total - self.first_unit_s)
        return (f"sample.py: first batch-draw took {_duration(self.first_unit_s)}; estimated {_duration(total)} for "
                f"all {self.units} (done around {end:%H:%M:%S} UTC)")

    def write(self, line: str) -> None:
        """Print a line above the bar (never onto it)."""
        self.bar.write(line, file=self.file)

    def close(self) -> None:
        self.bar.close()
