"""glibc malloc settings that keep freed tensor memory inside the process (CPU training speed).

PyTorch's CPU tensors come from the C library's malloc. By default glibc serves blocks above a
(dynamic, at most 32 MiB) threshold with mmap and returns them with munmap, and trims the top of
its heap after large frees, so the next training step touches fresh pages again and the kernel
zero-fills them one 4 KiB page fault at a time. Measured on the 2-core CI machine for one SR-160
training step (fp32, Adam): batch 4 made 2.1 million minor page faults (8 GiB of zero-filled pages)
and spent 4.6-5.9 s of its 18 CPU-seconds in the kernel; batch 1, 120,000 faults and 0.25 s.
With the settings below: under 5,000 faults and 0.004 s at batch 1 (`benchmarks/RESULTS.md`).

    MALLOC_ARENA_MAX=1              one arena: worker threads reuse the same freed blocks
    MALLOC_MMAP_MAX_=0              never mmap (so never munmap) a block
    MALLOC_TRIM_THRESHOLD_=1 TiB    never give the top of the heap back
    MALLOC_TOP_PAD_=256 MiB         grow the heap in large steps

The cost is the same as a GPU caching allocator's: the process keeps its peak memory. glibc reads
these variables only when a process starts, so `use_caching_malloc()` re-executes the entry point
once with them set. It is called from `train.py` and `sample.py` (only when run as scripts) before
anything heavy is imported; set MSDIFF_SYSTEM_MALLOC=1 to keep the system defaults. This module
imports nothing from torch.
"""
from __future__ import annotations

import os
import platform
import sys

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
OPT_OUT = "MSDIFF_SYSTEM_MALLOC"
_DONE = "MSDIFF_MALLOC_REEXEC"        # set in the re-executed process: never re-execute twice


def caching_malloc_active() -> bool:
    """True when this process started with every setting of `SETTINGS`."""
    return all(os.environ.get(k) == v for k, v in SETTINGS.items())


def use_caching_malloc() -> None:
    """Re-execute the running script with `SETTINGS` in its environment (once; glibc Linux only).

    A variable the user already set keeps the user's value. Returns without doing anything when the
    settings are active, after the one re-execution, when MSDIFF_SYSTEM_MALLOC=1, or when the C
    library is not glibc. Otherwise it does not return: the process image is replaced (same PID,
    same arguments, same interpreter flags), so call it before doing any work.
    """
    if os.environ.get(OPT_OUT) == "1" or os.environ.get(_DONE) == "1" or caching_malloc_active():
        return
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    for key, value in SETTINGS.items():
        os.environ.setdefault(key, value)
    os.environ[_DONE] = "1"
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
