"""Numba's parallel kernels, kept inside the process's torch thread budget.

Numba's default OpenMP threading layer shares the OpenMP runtime with torch, and every parallel launch sets
that runtime's thread count to numba's (all cores by default). Left alone, one metric call in a process that
asked torch for one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``: e.g. each of two trainings
sharing a 2-core machine) turns torch's ops multi-threaded from then on, and the processes fight over the
cores (a CAT-K step with closed-loop validation went from 2 s to 20 s that way). ``parallel_kernel`` runs
each kernel with torch's current thread count and puts that count back if the launch changed it.

The same runtime is not fork-safe: a process forked after the parent ran a multi-threaded torch op or numba
kernel inherits a thread pool whose threads do not exist, and its first multi-threaded op waits for them forever
(``gym.make_vec(..., vectorization_mode="async")`` hung so on its first ``reset``). ``single_thread_after_fork``,
registered when ``envs`` is imported, makes every forked child single-threaded (one OpenMP team of one never
touches the pool), as PyTorch's own DataLoader workers are. A forked child must not raise the count again (the
pool is broken in it); processes started with ``spawn`` or ``forkserver`` are unaffected.
"""

from __future__ import annotations

import functools
import os
import sys


def single_thread_after_fork() -> None:
    """``os.register_at_fork`` hook of a forked child: torch (if imported) to one thread (see the module doc)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


_REGISTERED: list[bool] = []


def register_fork_safety() -> None:
    """Register ``single_thread_after_fork`` once per process (``envs/__init__.py`` does)."""
    if not _REGISTERED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=single_thread_after_fork)
        _REGISTERED.append(True)


def parallel_kernel(fn=None, **options):
    """``numba.njit(cache=True, nogil=True, parallel=True, **options)`` of ``fn``, called (from Python only) with
    as many threads as torch uses now. The compiled dispatcher is ``.kernel``. Every numba kernel with
    ``parallel=True`` in the project goes through here (``@parallel_kernel`` or ``@parallel_kernel(fastmath=True)``)."""
    if fn is None:
        return lambda f: parallel_kernel(f, **options)
    import numba
    import torch

    kernel = numba.njit(cache=True, nogil=True, parallel=True, **options)(fn)

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
