"""A learned boundary map: for each voxel, the probability that it lies on a boundary between two
bodies, from a bank of filters of the normalised image, by gradient-boosted trees. This is the
pixel classifier of the FIB-SEM agglomeration pipelines (ilastik's filters feeding gala and
NeuroProof), here only where the learned refinement needs it: its base fills the voxels the
flood left free by a seeded watershed of this map instead of the raw image
(:func:`floodfilling.inference.learned.base_tile`). The image's darkness cannot tell a glial sheet
or a dark cytoplasm from a membrane; filters at several scales, trained on the lab's own labels,
can (FIB-25 cube halves, other half trained: learned refinement 1.175 / 1.266 -> see README).

Filter bank (:data:`FILTERS`, in that order; scipy.ndimage on float32, ``truncate`` 4): the image;
Gaussian smoothing at sigma 1, 2, 4; gradient magnitude at sigma 1, 2; Laplacian of Gaussian at
sigma 1, 2, 4; the three eigenvalues of the Hessian (ascending) at sigma 1.5 and 3. A voxel's
filters see the image within :data:`HALO` voxels (4 x the largest sigma); nearer an array's
edge they see the edge mirrored (scipy's "reflect"), so a tile's map equals the volume's only
where its window reaches that far (the refine tiles' halo, 32 by default, does).

Labels (:func:`boundary_labels`): a voxel is boundary where a face neighbour carries another
nonzero label, or where its own label is 0 within 2 voxels of a labelled voxel (0 drawn as the
boundary, as in the dev volume); label 0 deeper in an unlabelled region is not trained on.

Training (:func:`fit_boundary`) draws :data:`SAMPLES` voxels of each volume (a seeded draw, in
raster order) and fits LightGBM with fixed options on one thread: the same inputs give the same
text model. The map is evaluated by :mod:`floodfilling.inference.trees` (NumPy; LightGBM is
needed to train only), in chunks of :data:`CHUNK` voxels, and only where it is asked for (the
free voxels: a watershed reads no other).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .trees import TreeModel, parse_lightgbm

SIGMAS_SMOOTH = (1.0, 2.0, 4.0)  # Gaussian
SIGMAS_GRADIENT = (1.0, 2.0)  # gradient magnitude
SIGMAS_LOG = (1.0, 2.0, 4.0)  # Laplacian of Gaussian
SIGMAS_HESSIAN = (1.5, 3.0)  # Hessian eigenvalues
FILTERS = (("image",) + tuple(f"gauss_s{s:g}" for s in SIGMAS_SMOOTH)
           + tuple(f"gradient_s{s:g}" for s in SIGMAS_GRADIENT) + tuple(f"log_s{s:g}" for s in SIGMAS_LOG)
           + tuple(f"hessian{k}_s{s:g}" for s in SIGMAS_HESSIAN for k in range(3)))
HALO = 16  # voxels a filter sees around a voxel: 4 x the largest sigma (scipy's truncate 4)
SAMPLES = 200_000  # voxels drawn per volume for training (fewer where a volume has fewer)
ROUNDS = 100  # boosting rounds
# LightGBM options: one thread, deterministic (the same model file twice)
PARAMS = {"objective": "binary", "learning_rate": 0.1, "num_leaves": 31, "min_data_in_leaf": 50,
          "num_threads": 1, "deterministic": True, "force_row_wise": True, "seed": 0, "verbose": -1}
CHUNK = 65_536  # voxels evaluated at once (memory: CHUNK x trees x 8 bytes)


def filter_bank(image: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """The filters (:data:`FILTERS`) of ``image`` at the voxels ``where`` (bool, image's shape;
    None: all), one row per voxel in raster order: (k, len(FILTERS)) float32."""
    im = np.asarray(image, np.float32)
    if where is None:
        where = np.ones(im.shape, bool)
    if im.ndim != 3 or where.shape != im.shape:
        raise ValueError(f"filter_bank: image of shape {im.shape} and where {where.shape}: expected 3-d, equal")
    cols = [im[where]]
    cols += [ndimage.gaussian_filter(im, s)[where] for s in SIGMAS_SMOOTH]
    cols += [ndimage.gaussian_gradient_magnitude(im, s)[where] for s in SIGMAS_GRADIENT]
    cols += [ndimage.gaussian_laplace(im, s)[where] for s in SIGMAS_LOG]
    for s in SIGMAS_HESSIAN:
        h = np.empty((int(where.sum()), 3, 3), np.float32)
        for i in range(3):
            for j in range(i, 3):
                order = [0, 0, 0]
                order[i] += 1
                order[j] += 1
                h[:, i, j] = h[:, j, i] = ndimage.gaussian_filter(im, s, order=order)[where]
        ev = np.linalg.eigvalsh(h) if len(h) else np.zeros((0, 3), np.float32)
        cols += [ev[:, 0], ev[:, 1], ev[:, 2]]
    return np.stack(cols, axis=1).astype(np.float32)


def boundary_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boundary, unknown), both bool of ``labels``'s shape (module docstring)."""
    gt = np.asarray(labels)
    zero = gt == 0
    boundary = zero.copy()
    for ax in range(gt.ndim):
        lo = tuple(slice(0, -1) if a == ax else slice(None) for a in range(gt.ndim))
        hi = tuple(slice(1, None) if a == ax else slice(None) for a in range(gt.ndim))
        differ = (gt[lo] != gt[hi]) & ~zero[lo] & ~zero[hi]
        boundary[lo] |= differ
        boundary[hi] |= differ
    unknown = zero & (ndimage.distance_transform_edt(zero) > 2) if zero.any() else zero
    return boundary & ~unknown, unknown


def training_voxels(unknown: np.ndarray, region: np.ndarray | None = None, n: int = SAMPLES,
                    seed: int = 0) -> np.ndarray:
    """Bool mask of the voxels drawn for training: ``n`` of the voxels whose label is known
    (not ``unknown``; within ``region``, bool, when given), a seeded draw."""
    ok = ~unknown if region is None else (~unknown & region)
    idx = np.flatnonzero(ok.ravel())
    if len(idx) > n:
        idx = np.random.default_rng(seed).choice(idx, n, replace=False)
    mask = np.zeros(ok.size, bool)
    mask[idx] = True
    return mask.reshape(ok.shape)


def voxel_samples(image: np.ndarray, labels: np.ndarray,
                  region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(filters, boundary) of the voxels drawn for training (:func:`training_voxels`) from one
    volume: what a fit reads of it, made once however many fits read it."""
    boundary, unknown = boundary_labels(labels)
    take = training_voxels(unknown, region)
    return filter_bank(image, take), boundary[take]


def _fit(samples: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """LightGBM's text model of a boundary classifier fitted on ``samples`` (:func:`voxel_samples`)."""
    try:
        import lightgbm as lgb
    except ImportError:  # (train-refine checks it before any flood)
        raise ImportError("training the boundary map needs LightGBM: pip install 'floodfilling[refine]'") from None
    x = np.concatenate([a for a, _ in samples])
    y = np.concatenate([b for _, b in samples])
    if len(y) == 0 or y.all() or not y.any():
        raise ValueError(f"the boundary map needs boundary and inner voxels: got {int(y.sum())} boundary of {len(y)}; "
                         "label more of the volume")
    data = lgb.Dataset(x, label=y.astype(np.float64), feature_name=list(FILTERS),
                       params={"verbose": -1, "max_bin": 255}, free_raw_data=False)
    return lgb.train(dict(PARAMS), data, num_boost_round=ROUNDS).model_to_string()


def fit_boundary(volumes: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> str:
    """LightGBM's text model of a boundary classifier fitted on ``volumes``: (normalised image,
    labels, region: bool mask of the voxels it may learn from, or None for all)."""
    return _fit([voxel_samples(image, labels, region) for image, labels, region in volumes])


class BoundaryMap:
    """A trained boundary classifier (its LightGBM text model), evaluated with NumPy."""

    def __init__(self, text: str):
        self.text = text
        self.trees: TreeModel = parse_lightgbm(text, len(FILTERS))

    def probability(self, image: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """float32 of ``image``'s shape: the boundary probability at the voxels ``where`` (bool;
        None: all), 0 elsewhere."""
        where = np.ones(np.shape(image), bool) if where is None else np.asarray(where, bool)
        out = np.zeros(where.shape, np.float32)
        out[where] = self.predict_rows(filter_bank(image, where))
        return out

    def predict_rows(self, x: np.ndarray) -> np.ndarray:
        """The probabilities of filter rows ``x`` (:func:`filter_bank`), in chunks of :data:`CHUNK`."""
        p = np.empty(len(x), np.float64)
        for a in range(0, len(x), CHUNK):
            p[a:a + CHUNK] = self.trees.predict(x[a:a + CHUNK])
        return p


class HeldOutMap:
    """The boundary map a training volume's base is made with: at every voxel, the probability
    of a classifier that never saw that voxel's label (``parts``: (BoundaryMap, region: bool
    mask of the voxels it answers for, or None for all)), so that the merge classifier learns
    from a base as good as a new volume's, not a better one."""

    def __init__(self, parts: list[tuple[BoundaryMap, np.ndarray | None]]):
        self.parts = parts

    def probability(self, image: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        where = np.ones(np.shape(image), bool) if where is None else np.asarray(where, bool)
        x = filter_bank(image, where)  # once: each part answers for its rows
        p = np.zeros(len(x), np.float64)
        for m, region in self.parts:
            rows = slice(None) if region is None else region[where]
            p[rows] = m.predict_rows(x[rows])
        out = np.zeros(where.shape, np.float32)
        out[where] = p
        return out


def halves(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two bool masks of ``shape``: its lower and upper half along its longest axis."""
    ax = int(np.argmax(shape))
    lower = np.zeros(shape, bool)
    lower[tuple(slice(0, shape[ax] // 2) if a == ax else slice(None) for a in range(len(shape)))] = True
    return lower, ~lower


def held_out_maps(volumes: list[tuple[np.ndarray, np.ndarray]],
                  samples: list[tuple[np.ndarray, np.ndarray]] | None = None) -> list[HeldOutMap]:
    """For each (normalised image, labels) of ``volumes``, its :class:`HeldOutMap`: the map of a
    classifier fitted on all the other volumes (two or more), or with one volume, each half
    (:func:`halves`) answered by the classifier of the other half. ``samples``: each volume's
    :func:`voxel_samples`, when made already (two or more volumes)."""
    if len(volumes) >= 2:
        samples = samples or [voxel_samples(im, gt) for im, gt in volumes]
        return [HeldOutMap([(BoundaryMap(_fit([v for j, v in enumerate(samples) if j != i])), None)])
                for i in range(len(volumes))]
    (image, labels), = volumes
    a, b = halves(np.shape(labels))
    return [HeldOutMap([(BoundaryMap(fit_boundary([(image, labels, a)])), b),
                        (BoundaryMap(fit_boundary([(image, labels, b)])), a)])]


def train_boundary(volumes: list[tuple[np.ndarray, np.ndarray]]) -> tuple[str, list[HeldOutMap]]:
    """The boundary map of a refine model trained on ``volumes`` ((normalised image, labels)):
    the text model fitted on all of them, and each volume's :class:`HeldOutMap`; each volume's
    voxels drawn and filtered once for all the fits."""
    samples = [voxel_samples(im, gt) for im, gt in volumes]
    return _fit(samples), held_out_maps(volumes, samples)
