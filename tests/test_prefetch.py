"""The generic prefetcher of block inference (floodfilling.distributed.prefetch): order, claims
before preparation, bounded look-ahead, the consumer's wait, errors, closing."""

import threading
import time

import pytest

from floodfilling.boxes import ParameterError
from floodfilling.config import ConfigError, InferenceConfig
from floodfilling.distributed.prefetch import Prefetch


class Source:
    """Items 0..n-1; records claims and preparations (item, thread) in order."""

    def __init__(self, n, prep_s=0.0, fail_at=None):
        self.n, self.prep_s, self.fail_at = n, prep_s, fail_at
        self.next_item = 0
        self.events = []
        self.lock = threading.Lock()

    def claim(self):
        if self.next_item >= self.n:
            return None
        self.next_item += 1
        with self.lock:
            self.events.append(("claim", self.next_item - 1))
        return self.next_item - 1

    def prepare(self, item):
        with self.lock:
            self.events.append(("prepare", item))
        time.sleep(self.prep_s)
        if item == self.fail_at:
            raise ValueError(f"image.h5:raw block {item}: contains NaN or infinite values")
        return item * 10


def drain(p, consume_s=0.0):
    out = []
    while (got := p.next()) is not None:
        out.append(got)
        time.sleep(consume_s)
    return out


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_order_claims_before_preparation_and_bounded(depth):
    src = Source(7)
    with Prefetch(src.claim, src.prepare, depth) as p:
        got = []
        while (g := p.next()) is not None:
            got.append(g)
            assert src.next_item <= len(got) + depth  # never more than `depth` claimed ahead
    assert got == [(i, i * 10) for i in range(7)]
    for i in range(7):
        assert src.events.index(("claim", i)) < src.events.index(("prepare", i))
    assert p.items == 7 and p.next() is None


def test_wait_is_the_preparation_without_prefetch_and_hidden_with_it():
    n, prep, consume = 4, 0.1, 0.2
    src = Source(n, prep)
    with Prefetch(src.claim, src.prepare, 0) as p:
        drain(p, consume)
    assert p.wait_seconds >= n * prep and p.prepare_seconds >= n * prep
    src = Source(n, prep)
    with Prefetch(src.claim, src.prepare, 2) as p:
        drain(p, consume)
    # only the first item is waited for (consume > prep); a loaded machine gets a wide margin
    assert p.prepare_seconds >= n * prep and p.wait_seconds < 0.5 * n * prep, (p.wait_seconds, p.prepare_seconds)


@pytest.mark.parametrize("depth", [0, 2])
def test_a_preparation_error_is_raised_by_next_as_the_same_exception(depth):
    src = Source(6, fail_at=3)
    with Prefetch(src.claim, src.prepare, depth) as p:
        assert [p.next() for _ in range(3)] == [(0, 0), (1, 10), (2, 20)]
        with pytest.raises(ValueError) as e:
            p.next()
    assert str(e.value) == "image.h5:raw block 3: contains NaN or infinite values"
    assert src.next_item <= 4 + depth  # nothing more was claimed after closing


def test_close_cancels_what_has_not_started():
    src = Source(10, prep_s=0.1)
    p = Prefetch(src.claim, src.prepare, 2)
    assert p.next() == (0, 0)
    p.close()
    prepared = [e for e in src.events if e[0] == "prepare"]
    assert len(prepared) <= 3 and p.next() is None
    p.close()  # idempotent


def test_bad_depth_names_the_parameter():
    with pytest.raises(ParameterError, match=r"^prefetch=-1: must be >= 0"):
        Prefetch(lambda: None, lambda x: x, -1)
    with pytest.raises(ConfigError, match="option prefetch=-1"):
        InferenceConfig(prefetch=-1).validate()
