"""Device -> host reads: the one way inference code moves a torch tensor's values to the host.

:func:`to_host_async` starts the copy and returns a :class:`Pending`; :meth:`Pending.wait` is
the only way to read the values. On cuda/xpu the copy is asynchronous (``non_blocking``, into
pinned memory) on the current stream, or on ``stream``, and an event is recorded on that
stream right after it; ``wait`` blocks on that event, so it returns only once the copy (and
everything queued before it on that stream) has finished. ``after`` makes the copying
stream first wait for the event of an earlier Pending (``stream.wait_event``): a copy on a
side stream then reads a tensor only after the main stream's writes that the event follows.
On the cpu device torch runs every operation before returning, so the "copy" is the tensor
itself (no copy, no event) and ``wait`` only turns it into a NumPy array.

Call sites use the module attribute (``transfer.to_host_async(...)``), never a copy of the
name, so a test can replace it with an instrumented transfer (tests/test_transfer.py: a
fake asynchronous copy whose buffer holds garbage until ``wait``).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def backend(device: torch.device):
    """torch's module for an asynchronous device (``torch.cuda``, ``torch.xpu``), None for cpu
    (or a device type without streams)."""
    if device.type == "cpu":
        return None
    mod = getattr(torch, device.type, None)
    return mod if mod is not None and hasattr(mod, "Event") and hasattr(mod, "Stream") else None


def record_event(device: torch.device, stream=None):
    """An event recorded on ``stream`` (default: the device's current stream); None on cpu."""
    mod = backend(device)
    if mod is None:
        return None
    ev = mod.Event()
    if stream is None:
        ev.record()
    else:
        ev.record(stream)
    return ev


def new_stream(device: torch.device):
    """A second stream of an asynchronous device (for copies that must not queue behind the
    main stream's work); None on cpu."""
    mod = backend(device)
    return None if mod is None else mod.Stream(device=device)


class Pending:
    """A device -> host copy in flight. :meth:`wait` is the only way to read it."""

    __slots__ = ("_host", "event")

    def __init__(self, host: torch.Tensor, event=None):
        self._host = host  # host tensor the copy lands in (garbage until the event completes)
        self.event = event  # recorded right after the copy on its stream (None on cpu)

    def wait(self) -> np.ndarray:
        """Blocks until the copy is done; the values as a NumPy array."""
        if self.event is not None:
            self.event.synchronize()
        return self._host.numpy()


def to_host_async(tensor: torch.Tensor, *, stream=None, after: Pending | None = None) -> Pending:
    """Starts copying ``tensor`` to the host and returns its :class:`Pending` copy.

    ``stream``: the stream that copies (default: the current one); ``after``: a Pending whose
    event that stream waits for before copying (the step whose writes the copy must see).
    """
    device = tensor.device
    mod = backend(device)
    if mod is None:  # cpu: the values are final now (another device without streams: a blocking copy)
        return Pending(tensor.detach() if device.type == "cpu" else tensor.detach().to("cpu"), None)
    ctx = contextlib.nullcontext() if stream is None else mod.stream(stream)
    with ctx:
        if after is not None and after.event is not None:
            mod.current_stream(device).wait_event(after.event)
        host = tensor.detach().to("cpu", non_blocking=True)  # torch pins the destination (cuda)
        event = record_event(device)
    return Pending(host, event)
