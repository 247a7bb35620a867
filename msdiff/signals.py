"""Process-wide signal flags of the entry points (no torch, no Lightning: installed first thing).

SLURM announces the end of a job with SIGUSR1 (``--signal=USR1@N``) and preempts with SIGTERM. A
signal that arrives while Python imports torch or while a checkpoint is restored must not kill the
process (SLURM would not requeue a job killed by status 138/143): :func:`install_preemption_handlers`
is called by train.py before anything heavy is imported and only records the signal;
:class:`msdiff.callbacks.Preemption` reads :func:`preemption_signal` at every batch boundary (and
during validation), and train.py checks it before training starts. Ctrl-C (SIGINT) is recorded too
(:func:`interrupted`) so that train.py can tell Lightning's own ``exit(1)`` after a KeyboardInterrupt
from a real failure and exit 130.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

PREEMPTION_SIGNALS = ("SIGUSR1", "SIGTERM")

_state: dict[str, Optional[int]] = {"preempt": None, "interrupt": None}


def _on_preemption(signum, frame) -> None:
    _state["preempt"] = signum


def _on_interrupt(signum, frame) -> None:
    _state["interrupt"] = signum
    raise KeyboardInterrupt


def preemption_handler(signum, frame) -> None:
    """The handler itself (also re-installed by the Preemption callback over Lightning's own)."""
    _on_preemption(signum, frame)


def install_preemption_handlers() -> bool:
    """Record SIGUSR1/SIGTERM instead of dying, and SIGINT before raising KeyboardInterrupt as usual.
    False when not on the main thread (signal handlers cannot be set there)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for name in PREEMPTION_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _on_preemption)
    signal.signal(signal.SIGINT, _on_interrupt)
    return True


def preemption_signal() -> Optional[int]:
    """The number of the last SIGUSR1/SIGTERM received since :func:`reset`, or None."""
    return _state["preempt"]


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) was received since :func:`reset`."""
    return _state["interrupt"] is not None


def record_preemption(signum: int) -> None:
    """Set the preemption flag as if ``signum`` had been received (tests, other handlers)."""
    _state["preempt"] = int(signum)


def reset() -> None:
    """Forget received signals (the start of a new run in the same process, e.g. in tests)."""
    _state["preempt"] = None
    _state["interrupt"] = None
