"""Process memory: handing freed memory back to the system, letting go of mapped weight
files, and the peak resident set size."""

from __future__ import annotations

import ctypes
import sys


def release_memory() -> None:
    """Free what Python no longer references, and hand the C heap's free pages back to the system.

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MiB
    as big blocks are freed: a layer's weights qualify) for reuse, so a
    process that built and dropped a model copy stays that much larger; `malloc_trim`
    returns them.
    """
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def detach_from_files(module) -> int:
    """Copy into ordinary memory each tensor of `module` that still points into a memory-mapped
    weights file; return how many were copied.

    Loading safetensors maps the whole file and the parameters point into it. A
    technique that replaces most layers in place (quantization) leaves a few
    tensors (norms) there, and those keep the whole mapping, hundreds of MB of
    resident pages, alive as long as the model lives. Copying them out lets
    the mapping go. Linux only (it reads /proc/self/maps); elsewhere a no-op.
    """
    import itertools

    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 6 and fields[-1].endswith(".safetensors"):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return 0
    copied = 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in ranges):
            t.data = t.data.clone()
            copied += 1
    return copied


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: on Linux its high-water mark (VmHWM,
    which `PeakMemory` in `measure.speed` resets), elsewhere `ru_maxrss`. The one place that
    reads either: `ru_maxrss` counts bytes on macOS and KiB on Linux and the BSDs.

    (Not its children's: a forked child's peak counts the parent's pages it
    shared before `exec`, so `RUSAGE_CHILDREN` overstates a benchmark process.)
    """
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    import resource

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def peak_memory() -> dict:
    """Peak resident memory of this process so far, in MiB, as results record it."""
    return {"peak_rss_mib": round(peak_rss_mb(), 1)}
