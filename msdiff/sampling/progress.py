"""Progress and planned cost of a sample.py run (rank 0 only).

    progress = SamplingProgress(conditions, draws, nfe, batches, world_size, device)
    print(progress.plan_line())     # before the first batch: what the run costs
    progress.start_draw(k, rows)    # before draw k of a batch of `rows` conditions
    progress.step(rows)             # from a forward pre-hook on the network: one evaluation
    line = progress.end_batch()     # after each batch; the first returns the time estimate
    progress.close()

The bar counts network evaluations of this process's batches (a forward pass of the batch is one;
a batched guidance pass of 2B rows counts 2, as `Guidance.nfe` does), so it moves at every
step of every draw and its ETA is the remaining evaluations at the measured rate. The postfix shows
the batch, the draw and the step within the draw. With an adaptive sampler (probability-flow ODE)
the number of evaluations is not known in advance: the bar counts without a total.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Optional, TextIO


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{seconds:.1f} s")


class SamplingProgress:
    """A tqdm bar over network evaluations plus the planned-cost and time-estimate lines.

    conditions: N (all processes); draws: K; nfe: network evaluations per sample (None: adaptive);
    batches: this process's batches; world_size: processes; device: "cpu" or "cuda"."""

    def __init__(self, conditions: int, draws: int, nfe: Optional[int], batches: int, world_size: int,
                 device: str, file: TextIO = sys.stderr) -> None:
        from tqdm import tqdm

        self.conditions, self.draws, self.nfe, self.batches = conditions, draws, nfe, batches
        self.world_size, self.device = world_size, device
        total = batches * draws * nfe if nfe is not None else None
        self.bar = tqdm(total=total, unit="eval", desc="sampling", dynamic_ncols=True, file=file,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} evaluations "
                                   "[{elapsed}<{remaining}, {rate_fmt}]{postfix}" if total else None)
        self.batch, self.draw, self.in_draw, self.rows = 0, 0, 0.0, 1
        self.t0 = time.perf_counter()
        self.first_batch_s: Optional[float] = None

    def plan_line(self) -> str:
        """What the run costs: N conditions x K draws x E evaluations, and the batched calls per device."""
        e = str(self.nfe) if self.nfe is not None else "an adaptive number of"
        per_sample = f" = {self.conditions * self.draws * self.nfe:,} sample-evaluations" if self.nfe else ""
        calls = f" = {self.batches * self.draws * self.nfe:,} batched network calls" if self.nfe else ""
        return (f"sample.py: planned {self.conditions} conditions x {self.draws} draws x {e} network evaluations"
                f"{per_sample}; on {self.world_size} {self.device} device(s), device 0 runs {self.batches} batches "
                f"x {self.draws} draws{' x ' + str(self.nfe) if self.nfe else ''}{calls}; "
                "a time estimate follows the first batch")

    def start_draw(self, k: int, rows: int) -> None:
        self.draw, self.in_draw, self.rows = k, 0.0, max(int(rows), 1)
        self._postfix()

    def step(self, rows: Optional[int] = None) -> None:
        """One network forward pass of `rows` rows (None: the batch): rows / batch evaluations."""
        n = 1.0 if rows is None else rows / self.rows
        self.in_draw += n
        self.bar.update(n)
        self._postfix()

    def _postfix(self) -> None:
        of = f"/{self.nfe}" if self.nfe is not None else ""
        self.bar.set_postfix_str(f"batch {self.batch + 1}/{self.batches}, draw {self.draw + 1}/{self.draws}, "
                                 f"step {self.in_draw:.0f}{of}", refresh=False)

    def end_batch(self) -> Optional[str]:
        """Close a batch; after the first, the line estimating the whole run's time."""
        self.batch += 1
        if self.first_batch_s is not None:
            return None
        self.first_batch_s = time.perf_counter() - self.t0
        total = self.first_batch_s * self.batches
        end = datetime.now(timezone.utc) + timedelta(seconds=total - self.first_batch_s)
        return (f"sample.py: first batch took {_duration(self.first_batch_s)}; estimated {_duration(total)} for all "
                f"{self.batches} batches (done around {end:%H:%M:%S} UTC)")

    def close(self) -> None:
        self.bar.close()
