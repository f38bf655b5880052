"""Merging touching objects in order of confidence (the learned refinement,
:mod:`floodfilling.inference.learned`).

:func:`agglomerate` takes a :class:`~floodfilling.inference.contacts.ContactGraph` and a scorer
(features of pairs -> merge probability) and merges, one pair at a time, the pair of highest
probability while it is at least ``threshold``. After each merge the merged object's statistics
and those of its pairs are the sums of its parts' (:func:`~floodfilling.inference.contacts.merged_node`,
:func:`~floodfilling.inference.contacts.merged_edge`) and every pair of the merged object is
scored again; a priority queue holds the scores, and an entry whose objects changed since it
was scored (a version per object) is skipped when it comes up. Ties go to the pair with the
smaller ids (a, b); the merged object keeps the smaller id, so every object's id is the
smallest of its parts'. The result is a function of the graph and the scorer alone
(``tests/test_learned_refine.py`` compares it with recomputing every feature from the merged
volume after each merge).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .contacts import ContactGraph, features, merged_edge, merged_node

Scorer = Callable[[np.ndarray], np.ndarray]  # features (k, F) -> merge probabilities (k,)


@dataclass
class Agglomeration:
    """What :func:`agglomerate` did: each merged object's id -> the id of the object it is part
    of now (the smallest id of its group), and the merges in order (a, b, probability)."""

    lut: dict[int, int] = field(default_factory=dict)
    merges: list[tuple[int, int, float]] = field(default_factory=list)


def agglomerate(graph: ContactGraph, score: Scorer, threshold: float, *,
                gate: Callable[[int, int], bool] | None = None,
                on_score: Callable[[np.ndarray, np.ndarray], None] | None = None,
                on_merge: Callable[[int, int], None] | None = None) -> Agglomeration:
    """Merges the pairs of ``graph`` in order of decreasing ``score`` while it is at least
    ``threshold`` (see the module docstring). ``gate(a, b)``: False leaves the best pair
    unmerged (training walks the merges the labels allow); ``on_score(pairs (k, 2), features
    (k, F))`` sees every batch of pairs scored, ``on_merge(a, b)`` every merge (b into a)."""
    nodes = {int(i): graph.node_stats[k].copy() for k, i in enumerate(graph.ids)}
    adj: dict[int, dict[int, np.ndarray]] = {i: {} for i in nodes}
    for (a, b), e in zip(graph.pairs, graph.edge_stats):
        a, b = int(a), int(b)
        adj[a][b] = adj[b][a] = e.copy()
    version = dict.fromkeys(nodes, 0)
    heap: list[tuple[float, int, int, int, int]] = []

    def push(pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        e = np.stack([adj[a][b] for a, b in pairs])
        x = features(e, np.stack([nodes[a] for a, _ in pairs]), np.stack([nodes[b] for _, b in pairs]))
        arr = np.asarray(pairs, np.int64)
        if on_score is not None:
            on_score(arr, x)
        p = np.asarray(score(x), np.float64).reshape(-1)
        for (a, b), pk in zip(pairs, p):
            heapq.heappush(heap, (-float(pk), a, b, version[a], version[b]))

    push([(int(a), int(b)) for a, b in graph.pairs])
    out = Agglomeration()
    while heap:
        negp, a, b, va, vb = heapq.heappop(heap)
        if a not in nodes or b not in nodes or version[a] != va or version[b] != vb:
            continue  # stale: an object changed since this pair was scored
        if -negp < threshold:
            break
        if gate is not None and not gate(a, b):
            continue
        nodes[a] = merged_node(nodes[a], nodes[b], adj[a][b])
        del adj[a][b]
        for c, e in adj.pop(b).items():
            if c == a:
                continue
            del adj[c][b]
            adj[a][c] = adj[c][a] = merged_edge(adj[a][c], e) if c in adj[a] else e
        del nodes[b]
        version[a] += 1
        out.lut[b] = a
        out.merges.append((a, b, -negp))
        if on_merge is not None:
            on_merge(a, b)
        push([(min(a, c), max(a, c)) for c in sorted(adj[a])])
    for k in list(out.lut):  # chains: every merged id to its group's id
        r = out.lut[k]
        while r in out.lut:
            r = out.lut[r]
        out.lut[k] = r
    return out


def apply_lut(seg: np.ndarray, lut: dict[int, int]) -> np.ndarray:
    """``seg`` with every id ``k`` in ``lut`` replaced by ``lut[k]`` (same dtype)."""
    if not lut:
        return seg.copy()
    keys = np.fromiter(lut.keys(), np.int64)
    vals = np.fromiter(lut.values(), np.int64)
    flat = seg.ravel()
    uniq, inv = np.unique(flat, return_inverse=True)
    mapped = uniq.astype(np.int64).copy()
    order = np.argsort(keys)
    ks, vs = keys[order], vals[order]
    pos = np.searchsorted(ks, uniq)
    hit = (pos < len(ks)) & (ks[np.minimum(pos, len(ks) - 1)] == uniq)
    mapped[hit] = vs[pos[hit]]
    return mapped[inv].reshape(seg.shape).astype(seg.dtype)
