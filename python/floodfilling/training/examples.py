"""Training examples whose FOV moves are decided by the model's own predictions.

One *example* is a patch of ``fov + 2 * deltas`` voxels (z, y, x) around a training
coordinate, with

* the normalised image,
* the target: 0.95 where the voxel belongs to the object under the patch centre, 0.05
  elsewhere (everywhere when the centre is background, label 0),
* a seed canvas of logits: logit(0.05) everywhere, logit(0.95) at the centre.

The example is a *sequence* of FOV positions: first the centre, then the 26 shifts by
``+-deltas`` (:func:`move_offsets`, a fixed order). A position is visited only if the canvas
there is ``>= logit(0.9)`` *when its turn comes*, so the moves depend on what the network
predicted at the earlier positions: after each training step the predicted logits are written
back over the canvas at that FOV. A batch holds ``B`` independent sequences; a slot whose
sequence has no valid move left starts the next example.

Everything is a function of ``(seed, example number)``: example ``k`` of rank ``r`` (of ``W``)
uses coordinate ``g = k * W + r`` (modulo the list length: the ranks share the list
round-robin) and draws its augmentation (flips of z, y, x; y/x transposition) from
``np.random.default_rng((seed, g))``. The state of a stream is therefore small: the next
example number and, per slot, the example number, the move pointer and the canvas
(:meth:`ExampleStream.state_dict`), which makes training resumable bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..config import MOVE_THRESHOLD, SEED_INIT, SEED_PAD  # noqa: F401 - the reference's values, shared with inference

LABEL_TRUE, LABEL_FALSE = 0.95, 0.05  # soft labels


class ExampleError(ValueError):
    """Geometry or data that cannot give training examples (one-line message)."""


def logit(p: float) -> np.float32:
    return np.float32(np.log(p / (1.0 - p)))


def _int3(v, what: str) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v),) * 3
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ExampleError(f"{what} must be 3 integers (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Geometry:
    """FOV and move sizes, (z, y, x)."""

    fov: tuple[int, int, int] = (33, 33, 33)
    deltas: tuple[int, int, int] = (8, 8, 8)

    def __post_init__(self) -> None:
        fov, deltas = _int3(self.fov, "fov"), _int3(self.deltas, "deltas")
        if any(f < 3 or f % 2 == 0 for f in fov):
            raise ExampleError(f"fov must be odd and >= 3 on every axis, got {fov}")
        if any(d < 0 or d > f // 2 for d, f in zip(deltas, fov)):
            raise ExampleError(f"deltas must be between 0 and fov//2 on every axis, got {deltas} for fov {fov}")
        object.__setattr__(self, "fov", fov)
        object.__setattr__(self, "deltas", deltas)

    @property
    def patch(self) -> tuple[int, int, int]:
        """Size of one example: fov + 2 * deltas."""
        return tuple(f + 2 * d for f, d in zip(self.fov, self.deltas))  # type: ignore[return-value]

    @property
    def margin(self) -> tuple[int, int, int]:
        """Half the patch: coordinates must be at least this far from every border."""
        return tuple(p // 2 for p in self.patch)  # type: ignore[return-value]

    def check_fits(self, shape, what: str = "volume") -> None:
        if any(p > s for p, s in zip(self.patch, shape)):
            raise ExampleError(f"the training patch fov + 2*deltas = {self.patch} does not fit in the {what} "
                               f"of shape {tuple(shape)}; use a smaller fov=Z,Y,X or deltas=Z,Y,X")


def move_offsets(deltas) -> list[tuple[int, int, int]]:
    """The centre, then the 26 shifts by +-deltas in (dz, dy, dx) lexicographic order
    (-1, 0, +1 per axis); duplicates (an axis with delta 0) are dropped."""
    d = _int3(deltas, "deltas")
    out = [(0, 0, 0)]
    for s in itertools.product((-1, 0, 1), repeat=3):
        off = (s[0] * d[0], s[1] * d[1], s[2] * d[2])
        if off not in out:
            out.append(off)
    return out


def augmentation(seed: int, g: int) -> tuple[tuple[bool, bool, bool], bool]:
    """(flip z, flip y, flip x), transpose y/x for coordinate draw ``g``."""
    rng = np.random.default_rng((int(seed), int(g)))
    flips = rng.random(3) < 0.5
    transpose = bool(rng.random() < 0.5)
    return (bool(flips[0]), bool(flips[1]), bool(flips[2])), transpose


def apply_augmentation(a: np.ndarray, flips, transpose: bool) -> np.ndarray:
    sl = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    a = a[sl]
    if transpose:
        a = a.swapaxes(1, 2)
    return np.ascontiguousarray(a)


class ExampleSource:
    """Example patches from one normalised image and its labels at given coordinates."""

    def __init__(self, image: np.ndarray, labels: np.ndarray, coords: np.ndarray, geometry: Geometry,
                 seed: int = 0, rank: int = 0, world: int = 1, augment: bool = True):
        if image.shape != labels.shape:
            raise ExampleError(f"image shape {image.shape} differs from labels shape {labels.shape}")
        geometry.check_fits(image.shape)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
        if len(coords) == 0:
            raise ExampleError("no training coordinates")
        m = np.array(geometry.margin)
        ok = np.all((coords >= m) & (coords < np.array(image.shape) - m), axis=1)
        if not ok.all():
            raise ExampleError(f"{int((~ok).sum())} of {len(coords)} coordinates are closer than "
                               f"{tuple(int(x) for x in m)} to "
                               f"the border (the training patch would not fit)")
        self.image = image
        self.labels = labels
        self.coords = coords
        self.geometry = geometry
        self.seed = int(seed)
        self.rank, self.world = int(rank), int(world)
        self.augment = augment

    def coordinate_index(self, k: int) -> int:
        return (k * self.world + self.rank) % len(self.coords)

    def example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(image patch float32, target patch float32) of this rank's example number ``k``."""
        g = k * self.world + self.rank
        return self.patch(g, g)

    def patch(self, i: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        """(image patch, target patch) at coordinate ``i`` (modulo their number) with the
        augmentation of draw ``g``."""
        c = self.coords[i % len(self.coords)]
        m = np.array(self.geometry.margin)
        sl = tuple(slice(int(a - r), int(a + r + 1)) for a, r in zip(c, m))
        lab = self.labels[sl]
        centre = lab[tuple(m)]
        if centre != 0:
            target = np.where(lab == centre, np.float32(LABEL_TRUE), np.float32(LABEL_FALSE))
        else:
            target = np.full(lab.shape, LABEL_FALSE, dtype=np.float32)
        img = np.asarray(self.image[sl], dtype=np.float32)
        if self.augment:
            flips, tr = augmentation(self.seed, g)
            img = apply_augmentation(img, flips, tr)
            target = apply_augmentation(target, flips, tr)
        return np.ascontiguousarray(img), np.ascontiguousarray(target)


@dataclass
class Sequence:
    k: int  # example number (of this rank)
    image: np.ndarray
    target: np.ndarray
    canvas: np.ndarray  # logits
    move: int = 0  # index of the next offset to try
    steps: int = 0  # executed FOV steps
    fov_slices: tuple | None = None  # where the pending step's FOV is


@dataclass
class Counts:
    """Confusion counts at the 0.9 threshold plus loss / move statistics."""

    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    tn: float = 0.0
    loss_sum: float = 0.0
    loss_n: float = 0.0
    sequences: float = 0.0
    seq_steps: float = 0.0
    patch_tp: float = 0.0
    patch_fp: float = 0.0
    patch_fn: float = 0.0
    fields: ClassVar[tuple[str, ...]] = ("tp", "fp", "fn", "tn", "loss_sum", "loss_n", "sequences", "seq_steps",
                                         "patch_tp", "patch_fp", "patch_fn")

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in self.fields], dtype=np.float64)

    @classmethod
    def from_vector(cls, v) -> "Counts":
        c = cls()
        for f, x in zip(c.fields, v):
            setattr(c, f, float(x))
        return c

    def add_fov(self, logits: np.ndarray, target: np.ndarray, t: float) -> None:
        pred = logits >= t
        true = target > 0.5
        self.tp += float(np.count_nonzero(pred & true))
        self.fp += float(np.count_nonzero(pred & ~true))
        self.fn += float(np.count_nonzero(~pred & true))
        self.tn += float(np.count_nonzero(~pred & ~true))

    def summary(self) -> dict[str, float]:
        def ratio(a, b):
            return a / b if b > 0 else float("nan")

        p, r = ratio(self.tp, self.tp + self.fp), ratio(self.tp, self.tp + self.fn)
        pp = ratio(self.patch_tp, self.patch_tp + self.patch_fp)
        pr = ratio(self.patch_tp, self.patch_tp + self.patch_fn)
        return {
            "loss": ratio(self.loss_sum, self.loss_n),
            "precision": p,
            "recall": r,
            "f1": ratio(2 * p * r, p + r) if p == p and r == r else float("nan"),
            "accuracy": ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn),
            "sequences": self.sequences,
            "moves_per_sequence": ratio(self.seq_steps, self.sequences),
            "patch_precision": pp,
            "patch_recall": pr,
        }


class ExampleStream:
    """``batch`` independent move sequences over an :class:`ExampleSource`.

    Use: ``img, seed, target = stream.next_batch()``; run the network; ``stream.write_back(logits)``.
    ``max_examples`` (evaluation) stops starting new examples after that many; the batch then
    shrinks and :meth:`next_batch` returns ``None`` once every sequence is done.
    """

    def __init__(self, source: ExampleSource, batch: int, max_examples: int | None = None,
                 pad: float = SEED_PAD, init: float = SEED_INIT, threshold: float = MOVE_THRESHOLD):
        if batch < 1:
            raise ExampleError(f"batch must be >= 1, got {batch}")
        self.source = source
        self.batch = int(batch)
        self.max_examples = max_examples
        self.t_pad, self.t_init, self.t_move = logit(pad), logit(init), logit(threshold)
        self.offsets = move_offsets(source.geometry.deltas)
        self.next_k = 0
        self.slots: list[Sequence | None] = [None] * self.batch
        self._pending: list[int] = []
        self.counts = Counts()

    # -- sequences -----------------------------------------------------------------------
    def _start(self, k: int, canvas: np.ndarray | None = None, move: int = 0, steps: int = 0) -> Sequence:
        img, target = self.source.example(k)
        if canvas is None:
            canvas = np.full(img.shape, self.t_pad, dtype=np.float32)
            canvas[tuple(p // 2 for p in img.shape)] = self.t_init
        return Sequence(k, img, target, canvas, move, steps)

    def _next_position(self, s: Sequence) -> bool:
        """Advances ``s`` to its next valid FOV position; False when it has none."""
        c = np.array(self.source.geometry.margin)
        fov, deltas = self.source.geometry.fov, self.source.geometry.deltas
        while s.move < len(self.offsets):
            off = self.offsets[s.move]
            s.move += 1
            if s.canvas[tuple(c + off)] >= self.t_move:
                s.fov_slices = tuple(slice(d + o, d + o + f) for d, o, f in zip(deltas, off, fov))
                return True
        return False

    def _finish(self, s: Sequence) -> None:
        pred = s.canvas >= self.t_move
        true = s.target > 0.5
        self.counts.sequences += 1
        self.counts.seq_steps += s.steps
        self.counts.patch_tp += float(np.count_nonzero(pred & true))
        self.counts.patch_fp += float(np.count_nonzero(pred & ~true))
        self.counts.patch_fn += float(np.count_nonzero(~pred & true))

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(image, seed, target), each (n, 1, *fov) float32, n <= batch; None when exhausted."""
        self._pending = []
        for i in range(self.batch):
            while True:
                s = self.slots[i]
                if s is None:
                    if self.max_examples is not None and self.next_k >= self.max_examples:
                        break
                    s = self.slots[i] = self._start(self.next_k)
                    self.next_k += 1
                if self._next_position(s):
                    self._pending.append(i)
                    break
                self._finish(s)
                self.slots[i] = None
        if not self._pending:
            return None
        ss = [self.slots[i] for i in self._pending]
        img = np.stack([s.image[s.fov_slices] for s in ss])[:, None]
        seed = np.stack([s.canvas[s.fov_slices] for s in ss])[:, None]
        target = np.stack([s.target[s.fov_slices] for s in ss])[:, None]
        return img, seed, target

    def write_back(self, logits: np.ndarray) -> None:
        """Stores the predicted logits (n, 1, *fov) of the last batch in the canvases."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape[0] != len(self._pending):
            raise ExampleError(f"write_back got {logits.shape[0]} FOVs for a batch of {len(self._pending)}")
        for j, i in enumerate(self._pending):
            s = self.slots[i]
            s.canvas[s.fov_slices] = logits[j, 0]
            s.steps += 1
            self.counts.add_fov(logits[j, 0], s.target[s.fov_slices], self.t_move)
        self._pending = []

    # -- resumable state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The stream between batches (after :meth:`write_back`)."""
        return {
            "next_k": self.next_k,
            "slots": [None if s is None else {"k": s.k, "move": s.move, "steps": s.steps, "canvas": s.canvas.copy()}
                      for s in self.slots],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["slots"]) != self.batch:
            raise ExampleError(f"stream state has {len(state['slots'])} slots, this run has batch {self.batch}")
        self.next_k = int(state["next_k"])
        self.slots = [None if d is None else self._start(int(d["k"]), np.array(d["canvas"], dtype=np.float32),
                                                         int(d["move"]), int(d["steps"]))
                      for d in state["slots"]]
        self._pending = []


def run_sequences(net, stream: ExampleStream, device="cpu") -> Counts:
    """Runs ``stream`` to exhaustion without training (evaluation); returns its counts, the
    loss included (sigmoid cross-entropy, mean per FOV, as in training)."""
    import torch
    import torch.nn.functional as F

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            while True:
                b = stream.next_batch()
                if b is None:
                    break
                img, seed, target = b
                cl = torch.channels_last_3d
                out = net(torch.from_numpy(img).to(device).contiguous(memory_format=cl),
                          torch.from_numpy(seed).to(device).contiguous(memory_format=cl))
                loss = float(F.binary_cross_entropy_with_logits(out.float(), torch.from_numpy(target).to(device)))
                stream.counts.loss_sum += loss * img.shape[0]
                stream.counts.loss_n += img.shape[0]
                stream.write_back(out.float().cpu().numpy())
    finally:
        net.train(was_training)
    return stream.counts
