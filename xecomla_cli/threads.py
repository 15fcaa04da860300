"""Thread counts for small linear algebra."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """Run small LAPACK calls on one thread: these matrices gain nothing from threads, and OpenMP
    threads spinning against other busy processes made an SVD 30x slower on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
