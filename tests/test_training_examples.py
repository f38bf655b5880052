"""The FOV-moving example stream: targets, seeds, move rule, write-back, augmentation, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floodfilling.training.examples import (ExampleError, ExampleSource, ExampleStream, Geometry, apply_augmentation,
                                            augmentation, logit, move_offsets, run_sequences)

G = Geometry((5, 5, 5), (2, 2, 2))  # patch 9^3, margin 4


def volume(shape=(16, 17, 18), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    labels = np.zeros(shape, np.uint32)
    labels[:, :, : shape[2] // 2] = 3
    labels[:, :, shape[2] // 2:] = 9
    labels[:, : shape[1] // 3] = 0
    return image, labels


def test_move_offsets():
    offs = move_offsets((2, 3, 4))
    assert offs[0] == (0, 0, 0) and len(offs) == 27 == len(set(offs))
    assert all(abs(o[0]) in (0, 2) and abs(o[1]) in (0, 3) and abs(o[2]) in (0, 4) for o in offs)
    assert offs == move_offsets((2, 3, 4))  # fixed order
    assert len(move_offsets((0, 1, 1))) == 9  # delta 0 on an axis: no duplicates


def test_geometry_checks():
    assert G.patch == (9, 9, 9) and G.margin == (4, 4, 4)
    with pytest.raises(ExampleError, match="odd"):
        Geometry((4, 5, 5), (1, 1, 1))
    with pytest.raises(ExampleError, match="does not fit"):
        Geometry((33, 33, 33), (8, 8, 8)).check_fits((40, 60, 60))


def test_example_target_and_seed():
    image, labels = volume()
    coords = np.array([[8, 10, 5], [8, 10, 12], [8, 4, 5]])
    src = ExampleSource(image, labels, coords, G, augment=False)
    img, tgt = src.example(0)
    np.testing.assert_array_equal(img, image[4:13, 6:15, 1:10])
    want = np.where(labels[4:13, 6:15, 1:10] == 3, 0.95, 0.05).astype(np.float32)
    np.testing.assert_array_equal(tgt, want)
    _, tgt = src.example(2)  # background centre: all 0.05
    assert np.all(tgt == np.float32(0.05))
    stream = ExampleStream(src, 1)
    _, seed, _ = stream.next_batch()
    canvas = stream.slots[0].canvas
    assert canvas[4, 4, 4] == logit(0.95)
    assert np.count_nonzero(canvas == logit(0.05)) == canvas.size - 1
    assert seed.shape == (1, 1, 5, 5, 5) and seed[0, 0, 2, 2, 2] == logit(0.95)


def test_augmentation_consistent():
    image, labels = volume()
    coords = np.array([[8, 10, 9]] * 50)
    plain = ExampleSource(image, labels, coords, G, augment=False)
    aug = ExampleSource(image, labels, coords, G, seed=5, augment=True)
    seen = set()
    for k in range(50):
        flips, tr = augmentation(5, k)
        seen.add((flips, tr))
        img0, tgt0 = plain.example(k)
        img1, tgt1 = aug.example(k)
        np.testing.assert_array_equal(img1, apply_augmentation(img0, flips, tr))
        np.testing.assert_array_equal(tgt1, apply_augmentation(tgt0, flips, tr))
        assert tgt1[4, 4, 4] == np.float32(0.95)  # the centre stays the centre
    assert len(seen) > 8


class Constant(torch.nn.Module):
    """Predicts ``value`` everywhere (as logits)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, image, seed):
        return torch.full_like(seed, float(self.value))


class Halfspace(torch.nn.Module):
    """High logits in the x >= centre half of the FOV, low elsewhere."""

    def forward(self, image, seed):
        out = torch.full_like(seed, -5.0)
        out[..., seed.shape[-1] // 2:] = 5.0
        return out


def visited(net, batch=1, n=1):
    image, labels = volume()
    src = ExampleSource(image, labels, np.array([[8, 10, 9]]), G, augment=False)
    stream = ExampleStream(src, batch, max_examples=n)
    pos = []
    with torch.no_grad():
        while (b := stream.next_batch()) is not None:
            pos.append(tuple(s.start - 2 for s in stream.slots[stream._pending[0]].fov_slices))
            stream.write_back(net(torch.from_numpy(b[0]), torch.from_numpy(b[1])).numpy())
    return pos, stream.counts


def test_moves_follow_predictions():
    pos, c = visited(Constant(5.0))  # everything >= logit(0.9): all 27 positions
    assert pos == move_offsets((2, 2, 2)) and c.sequences == 1 and c.seq_steps == 27
    pos, c = visited(Constant(-5.0))  # nothing: only the centre
    assert pos == [(0, 0, 0)] and c.seq_steps == 1
    pos, _ = visited(Halfspace())  # after the centre step, only shifts with dx >= 0 reach the threshold
    assert pos[:3] == [(0, 0, 0), (-2, -2, 0), (-2, -2, 2)]
    assert all(p[2] >= 0 for p in pos)
    # (-2, 0, 0) was high after the centre step, but the step at (-2, -2, 2) wrote low logits there
    assert (-2, 0, 0) not in pos and (0, 0, 2) in pos


def test_write_back_and_counts():
    image, labels = volume()
    src = ExampleSource(image, labels, np.array([[8, 10, 5]]), G, augment=False)
    stream = ExampleStream(src, 2)
    img, seed, tgt = stream.next_batch()
    assert img.shape == seed.shape == tgt.shape == (2, 1, 5, 5, 5)
    logits = np.random.default_rng(0).normal(size=img.shape).astype(np.float32) * 4
    stream.write_back(logits)
    np.testing.assert_array_equal(stream.slots[1].canvas[2:7, 2:7, 2:7], logits[1, 0])
    pred, true = logits >= logit(0.9), tgt > 0.5
    assert stream.counts.tp == np.count_nonzero(pred & true)
    assert stream.counts.fp == np.count_nonzero(pred & ~true)
    assert stream.counts.fn == np.count_nonzero(~pred & true)
    with pytest.raises(ExampleError):
        stream.write_back(logits[:1])


def test_state_round_trip():
    image, labels = volume()
    rng = np.random.default_rng(1)
    coords = np.stack([rng.integers(4, s - 4, 40) for s in image.shape], 1)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 1, 3, padding=1)

    def f(img, seed):
        return seed + conv(torch.cat([img, seed], 1)) * 3

    def run(stream, steps):
        out = []
        with torch.no_grad():
            for _ in range(steps):
                b = stream.next_batch()
                out.append(b)
                stream.write_back(f(torch.from_numpy(b[0]), torch.from_numpy(b[1])).numpy())
        return out

    src = ExampleSource(image, labels, coords, G, seed=3, rank=1, world=3)
    a = ExampleStream(src, 3)
    run(a, 7)
    state = a.state_dict()
    rest_a = run(a, 9)
    b = ExampleStream(src, 3)
    b.load_state_dict(state)
    rest_b = run(b, 9)
    for x, y in zip(rest_a, rest_b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert src.coordinate_index(0) == 1 and src.coordinate_index(2) == 7  # rank 1 of 3: coords 1, 4, 7, ...


def test_run_sequences_evaluates_exact_count():
    image, labels = volume()
    src = ExampleSource(image, labels, np.array([[8, 10, 5], [8, 10, 12]]), G, augment=False)
    counts = run_sequences(Constant(-5.0), ExampleStream(src, 3, max_examples=5))
    assert counts.sequences == 5 and counts.seq_steps == 5
    s = counts.summary()
    assert s["recall"] == 0 and np.isnan(s["precision"])
