"""The processes of a `sample.py --devices D` run (plain Python, no torch).

Samples need no communication between devices (fixed batches, `msdiff.sampling.plan`; the metrics
are computed from the files afterwards), so process 0 simply starts D - 1 copies of the same command
with `MSDIFF_SAMPLE_RANK` / `MSDIFF_SAMPLE_WORLD` set; process r samples its share on device r and
exits (0 done, 75 stopped by a signal, 130 interrupted). Process 0 forwards SIGUSR1/SIGTERM/SIGINT to
them when it stops (a `kill PID` reaches only process 0), waits for all of them, then evaluates.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional

__all__ = ["RANK_ENV", "WORLD_ENV", "process_rank", "DeviceWorkers", "script_command"]

RANK_ENV, WORLD_ENV = "MSDIFF_SAMPLE_RANK", "MSDIFF_SAMPLE_WORLD"


def process_rank() -> tuple[int, int]:
    """(rank, world) of this process: (0, 1) unless started by `DeviceWorkers`."""
    return int(os.environ.get(RANK_ENV) or 0), int(os.environ.get(WORLD_ENV) or 1)


class DeviceWorkers:
    """Processes 1 .. world - 1 running `command` (module doc)."""

    def __init__(self, command: list[str], world: int) -> None:
        self.command, self.world = command, world
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "DeviceWorkers":
        for r in range(1, self.world):
            env = {**os.environ, RANK_ENV: str(r), WORLD_ENV: str(self.world)}
            self.procs.append(subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL))
        return self

    def send(self, sig: int) -> None:
        """Send `sig` to every process still running."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: Optional[float] = None) -> list[int]:
        """Exit statuses of processes 1 .. world - 1 (a process still running after `timeout` is killed)."""
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> list[int]:
        """Forward `sig` and wait for every process to end (each finishes its evaluation in flight)."""
        self.send(sig)
        return self.wait(timeout)


def script_command(script: str) -> list[str]:
    """The command that re-runs this sample.py process."""
    return [sys.executable, script, *sys.argv[1:]]
