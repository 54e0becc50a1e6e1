"""CPU thread policy for small problems.

Torch's intra-op thread pool costs more than it saves on small tensors: an elementwise
op on a few hundred numbers is ~3x slower with 2 threads than with 1, and EBMF makes
thousands of such calls. Small problems therefore run on one thread. The setting is per
calling thread (OpenMP / torch intra-op) and is restored on exit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

#: Problems with fewer elements than this run on one CPU thread.
SMALL_PROBLEM = 50_000


@contextmanager
def threads_for(size: int, device: torch.device):
    """Use one thread while ``size < SMALL_PROBLEM`` on the CPU."""
    n_threads = torch.get_num_threads()
    if device.type != "cpu" or size >= SMALL_PROBLEM or n_threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)
