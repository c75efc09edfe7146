"""`run_split`: a GIL-free compiled kernel run over chunks of its points on torch's thread count.

The engine's numba kernels (Mattes MI, and the trilinear sampler where no C compiler is found) and
the precision controller's statistics loop over points; the C kernels split their loops over
torch's own OpenMP threads instead (`dynomp/registration/sampler.c`, `filters.c`). A call with
enough points is split into as many chunks as torch has threads; the kernels release the GIL, and
the chunks other than the caller's run on plain Python threads that wait on a future between calls.
numba's own thread pools (OpenMP or workqueue) were tried first: they spun beside torch's OpenMP
threads on a 2-core machine, and whole registrations took anywhere from 16 to 56 s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

# below this many samples a call runs on the calling thread alone: handing work to a second thread
# costs tens of microseconds, more than a coarse level's whole sample
SPLIT_MINIMUM = 16384

_CPUS = os.cpu_count() or 1  # read once: os.cpu_count() took 20 us a call here, 5,600 calls a registration
_workers: dict[int, ThreadPoolExecutor] = {}  # by size: torch's thread count less the calling thread


def run_split(kernel: Callable[..., Any], *arguments: object, points: int, samples_per_point: int = 1) -> list[Any]:
    """Call `kernel(*arguments, start, stop)` over 0..points in chunks; return their results in order.

    One chunk per torch thread (the calling thread runs the first), or one call where torch has a
    single thread or there are fewer than `SPLIT_MINIMUM` samples (`points * samples_per_point`).
    """
    threads = min(torch.get_num_threads(), _CPUS)
    if threads < 2 or points * samples_per_point < SPLIT_MINIMUM:
        return [kernel(*arguments, 0, points)]
    workers = _workers.get(threads - 1)
    if workers is None:
        workers = _workers[threads - 1] = ThreadPoolExecutor(threads - 1, thread_name_prefix="dynomp-kernel")
    bounds = [points * part // threads for part in range(threads + 1)]
    pending = [workers.submit(kernel, *arguments, bounds[part], bounds[part + 1]) for part in range(1, threads)]
    first = kernel(*arguments, bounds[0], bounds[1])
    return [first, *(future.result() for future in pending)]
