"""Helpers shared by the native-kernel tests."""

from contextlib import contextmanager

from floodfilling import kernels as K


@contextmanager
def forced_parallel(threads=3, grain=5):
    """Run the native kernels multi-threaded even on tiny inputs (count_pairs included)."""
    native = K._native()
    old = native._set_parallel_grain(grain)
    old_pairs = native._set_count_pairs_grain(grain)
    K.set_num_threads(threads)
    try:
        yield
    finally:
        K.set_num_threads(0)
        native._set_parallel_grain(old)
        native._set_count_pairs_grain(old_pairs)
