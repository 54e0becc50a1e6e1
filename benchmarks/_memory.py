"""Peak resident memory of a block of code, for the benchmark scripts.

On Linux the kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs``
before the block, so the peak is exact; elsewhere the increase of ``getrusage`` maxrss is
reported, a lower bound. (tracemalloc does not see torch's allocations, and sampling RSS
would miss short peaks.) Run each measured case in a fresh process.
"""

from __future__ import annotations

import re
import sys


def _proc_status() -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as fh:
            text = fh.read()
    except OSError:
        return None
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if m is None:
            return None
        out[key] = int(m.group(1)) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Peak RSS increase over a block of code (see the module docstring)."""

    def __enter__(self):
        self.method = None
        status = _proc_status()
        if status is not None and _reset_peak():
            status = _proc_status()
            self.method, self.before = "vmhwm", status["VmRSS"]
        else:
            before = _maxrss_bytes()
            if before is not None:
                self.method, self.before = "maxrss", before
        return self

    def __exit__(self, *exc):
        if self.method == "vmhwm":
            self.peak_bytes = _proc_status()["VmHWM"] - self.before
        elif self.method == "maxrss":
            self.peak_bytes = _maxrss_bytes() - self.before
        else:
            self.peak_bytes = None
        return False


# --------------------------------------------------------------------------------- EM
