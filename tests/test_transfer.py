"""Every device -> host read waits for the copy that feeds it (floodfilling.inference.transfer).

On the cpu device a real copy is done when it returns, so a read that forgets to wait still
gets the right numbers. Here the transfer is replaced by a fake asynchronous one: the host
buffer of each copy holds NaN (garbage) until ``Pending.wait()`` fills in the values the copy
would deliver (the tensor's values when the copy was started, as a stream would). Under it,
the host path, the device path at K = 1, the pipelined device path (two alternating groups,
forced on cpu) and every object commit must still give the host path's results exactly; and
two deliberately broken variants that read a buffer before waiting (step results, object
commit) must give wrong results or fail, which shows the instrumentation can catch the bug.
(A NumPy view of the buffer taken before the wait and read after it is no bug: the copy lands
in that buffer. Reading values before the wait is.)

The cuda/xpu branch of to_host_async itself runs here too, on cpu tensors, with streams and
events that log what they are asked (FakeStreams): which stream each copy uses, which event
it waits for first, which event guards each read.
"""

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from floodfilling.inference import transfer
from floodfilling.inference.device import DeviceCanvas, DevicePredictor
from floodfilling.inference.predictor import Predictor

from test_device_path import run_blocks
from test_engine import DELTAS, FOV, blocks, bright_flood_net  # noqa: F401  (fixture)


class FakePending(transfer.Pending):
    """A copy in flight whose host buffer is NaN until :meth:`wait`."""

    __slots__ = ("_value", "waits", "after", "stream")

    def __init__(self, tensor: torch.Tensor, stream, after):
        value = tensor.detach().clone()  # what the copy delivers (cpu: final when started)
        super().__init__(torch.full_like(value, float("nan")), None)
        self._value, self.waits, self.after, self.stream = value, 0, after, stream

    def wait(self) -> np.ndarray:
        self._host.copy_(self._value)
        self.waits += 1
        return super().wait()


class FakeTransfer:
    """Replaces transfer.to_host_async; records every copy."""

    def __init__(self):
        self.copies: list[FakePending] = []

    def __call__(self, tensor, *, stream=None, after=None):
        p = FakePending(tensor, stream, after)
        self.copies.append(p)
        return p


@pytest.fixture
def fake(monkeypatch):
    """The fake asynchronous transfer in place of the real one (for one test)."""
    f = FakeTransfer()
    monkeypatch.setattr(transfer, "to_host_async", f)
    return f


class PeekingPending:
    """The bug: the copy's values read (copied out) before waiting for its event."""

    def __init__(self, pending):
        self.pending = pending

    def wait(self) -> np.ndarray:
        early = np.array(self.pending._host.numpy())  # read before the wait
        self.pending.wait()  # (the wait comes too late)
        return early


class ReadsStepBeforeWait(DevicePredictor):
    """Broken variant: reads each step's results before waiting for them."""

    def _collect_one(self, handle):
        pending, nq = handle
        return super()._collect_one((PeekingPending(pending), nq))


class ReadsCommitBeforeWait(DeviceCanvas):
    """Broken variant: reads the object's logits at commit before waiting for the copy."""

    def _commit_logits(self, box):
        pending = transfer.to_host_async(self._view(self.pool.logits)[box], stream=self.pool.side_stream(),
                                         after=self._last_step)
        return np.ascontiguousarray(PeekingPending(pending).wait()), (0, 0, 0)


class BrokenCommitPredictor(DevicePredictor):
    """Makes :class:`ReadsCommitBeforeWait` canvases."""

    def new_canvas(self, image, seeds, config, deltas_zyx, state=None):
        return ReadsCommitBeforeWait(self.pool, image, seeds, config, self.fov, self.deltas, state)


def device_factory(k, pipeline, cls=DevicePredictor):
    """run_blocks factory: the device path on torch's cpu device, K in flight, batches of K."""
    def make(cfg, _k):
        pred = cls(bright_flood_net(), FOV, DELTAS, cfg.with_overrides(resident="on"), device="cpu", max_batch=k)
        pred.pipeline = pipeline  # two alternating groups (the cuda/xpu default), forced on cpu
        return pred
    return make


def same(a, b) -> bool:
    """run_blocks results ``a`` (segmentation, origins, counters per block) equal ``b``'s."""
    return all(np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] and a[i][2] == b[i][2] for i in a)


@pytest.fixture(scope="module")
def host(blocks):  # noqa: F811
    """The host path with the real transfer: the results everything here must equal."""
    res, _ = run_blocks(blocks, lambda cfg, k: Predictor(bright_flood_net(), FOV, device="cpu"), 1)
    assert sum(r[2]["objects"] for r in res.values()) >= 8 and sum(r[2]["steps"] for r in res.values()) > 50
    return res


def test_every_read_waits_under_a_fake_asynchronous_transfer(blocks, host, fake):  # noqa: F811
    # the host path: Predictor.run's copy of the logits
    got, pred = run_blocks(blocks, lambda cfg, k: Predictor(bright_flood_net(), FOV, device="cpu"), 1)
    assert same(got, host) and len(fake.copies) == pred.calls
    for k, pipeline in ((1, False), (8, True), (5, True)):
        fake.copies.clear()
        got, pred = run_blocks(blocks, device_factory(k, pipeline), k)
        assert pred.pipeline_groups(k) == (2 if pipeline else 1)
        assert same(got, host), (k, pipeline)
        steps = [p for p in fake.copies if p._value.dim() == 2]  # (n, 12 + Q) step results
        commits = [p for p in fake.copies if p._value.dim() == 3]  # an object's box of logits
        assert len(steps) + len(commits) == len(fake.copies)
        assert len(steps) == pred.calls  # one device -> host copy per batched step
        assert len(commits) >= sum(r[2]["objects"] for r in host.values())  # (+ objects too small)
        assert all(p.waits == 1 for p in fake.copies)  # every copy read once, through wait()
        # a commit copy waits for its canvas's last step (collected, so already waited for)
        assert all(c.after is not None and c.after in steps and c.after.waits == 1 for c in commits)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("broken", ["step", "commit"])
def test_a_read_before_the_wait_is_caught(blocks, monkeypatch, broken):  # noqa: F811
    """Negative control: with the real cpu transfer the broken variant looks right; under the
    fake asynchronous transfer it gives wrong results (or fails). Three blocks, their first
    four seeds, pipelined."""
    few = [(image, seeds[:4]) for image, seeds in blocks[:3]]
    host, _ = run_blocks(few, lambda cfg, k: Predictor(bright_flood_net(), FOV, device="cpu"), 1)
    assert sum(r[2]["objects"] for r in host.values()) >= 3
    cls = ReadsStepBeforeWait if broken == "step" else BrokenCommitPredictor
    got, _ = run_blocks(few, device_factory(4, True, cls), 4)
    assert same(got, host)  # the bug is invisible without the instrumentation
    monkeypatch.setattr(transfer, "to_host_async", FakeTransfer())
    try:
        got, _ = run_blocks(few, device_factory(4, True, cls), 4)
    except (IndexError, ValueError):  # NaN face argmaxes as indices: caught too
        return
    assert not same(got, host)


def test_no_device_read_outside_transfer():
    """The inference modules read device tensors only through transfer (whose wait() the
    fake above instruments): no .cpu(), .numpy(), .item(), .to("cpu") or event wait elsewhere."""
    pattern = re.compile(r"\.cpu\(|\.numpy\(|\.item\(|\.to\(\s*[\"']cpu|\.synchronize\(")
    root = Path(transfer.__file__).parent
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(root.glob("*.py")) if p.name != "transfer.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    assert pattern.search(Path(transfer.__file__).read_text())  # the pattern does find reads


class FakeStreams:
    """Stands in for torch.cuda in transfer.backend, on the cpu device: streams and events
    that log what the real asynchronous branch of to_host_async asks of them."""

    class _Stream:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name

        def wait_event(self, ev):
            self.owner.log.append(("wait_event", self.name, ev.id))

    class _Event:
        def __init__(self, owner):
            self.owner, self.id = owner, len(owner.events)
            owner.events.append(self)

        def record(self, stream=None):
            self.owner.log.append(("record", (stream or self.owner.current).name, self.id))

        def synchronize(self):
            self.owner.log.append(("sync", None, self.id))

    def __init__(self):
        self.log, self.events = [], []
        self.main = self.current = FakeStreams._Stream(self, "main")

    def Event(self):  # noqa: N802  (torch.cuda.Event)
        return FakeStreams._Event(self)

    def Stream(self, device=None):  # noqa: N802  (torch.cuda.Stream)
        return FakeStreams._Stream(self, "side")

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev


@pytest.mark.parametrize("k, pipeline", [(1, False), (8, True)])
def test_stream_and_event_order_of_the_asynchronous_branch(blocks, host, monkeypatch, k, pipeline):  # noqa: F811
    """The cuda/xpu branch of to_host_async, run on cpu tensors with logging streams: each
    step's copy records an event on the main stream, which its collect waits for; each commit
    copies on the side stream after waiting there for its canvas's last step event (already
    waited for by the host), records its own event on the side stream and waits for it."""
    fs = FakeStreams()
    monkeypatch.setattr(transfer, "backend", lambda device: fs)
    got, pred = run_blocks(blocks, device_factory(k, pipeline), k)
    assert same(got, host)
    log = fs.log
    records = {e: i for i, (op, _, e) in enumerate(log) if op == "record"}
    syncs = [e for op, _, e in log if op == "sync"]
    assert sorted(syncs) == sorted(records) == list(range(len(fs.events)))  # each event: recorded, waited once
    assert all(records[e] < log.index(("sync", None, e)) for e in syncs)
    main = [e for (op, s, e) in log if op == "record" and s == "main"]
    assert len(main) == pred.calls  # one copy (one event) per batched step
    side = [i for i, (op, s, e) in enumerate(log) if op == "record" and s == "side"]
    assert len(side) >= sum(r[2]["objects"] for r in host.values())
    for i in side:  # commit: wait for the step event, record after the copy, then wait
        op, stream, step = log[i - 1]
        assert (op, stream) == ("wait_event", "side") and step in main
        assert log.index(("sync", None, step)) < i - 1  # the host already had that step's results
        assert log[i + 1] == ("sync", None, log[i][2])
