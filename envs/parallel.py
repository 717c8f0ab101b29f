"""Numba's parallel kernels, kept inside the process's torch thread budget.

Numba's default OpenMP threading layer shares the OpenMP runtime with torch, and every parallel launch sets
that runtime's thread count to numba's (all cores by default). Left alone, one metric call in a process that
asked torch for one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``: e.g. each of two trainings
sharing a 2-core machine) turns torch's ops multi-threaded from then on, and the processes fight over the
cores (a CAT-K step with closed-loop validation went from 2 s to 20 s that way). ``parallel_kernel`` runs
each kernel with torch's current thread count and puts that count back if the launch changed it.
"""

from __future__ import annotations

import functools

import numba
import torch


def parallel_kernel(fn):
    """``numba.njit(cache=True, nogil=True, parallel=True)`` of ``fn``, called (from Python only) with as many
    threads as torch uses now. The compiled dispatcher is ``.kernel``."""
    kernel = numba.njit(cache=True, nogil=True, parallel=True)(fn)

    @functools.wraps(fn)
    def call(*args):
        n = torch.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        try:
            return kernel(*args)
        finally:
            if torch.get_num_threads() != n:  # the first launch starts numba's pool and resets the runtime's count
                torch.set_num_threads(n)

    call.kernel = kernel
    return call
