"""Nearest-neighbour search of an anomaly bank: exact, or over inverted lists (fast).

Torch-free, numpy only. A patch's anomaly score is its distance to the nearest bank patch;
at batch 1 the exact search (one ``196 x K x C`` matrix product) costs more than the
backbone itself on a 2-core CPU. :class:`BankIndex` keeps the bank split into inverted
lists by k-means (IVF: Jegou, Douze & Schmid, "Product quantization for nearest neighbor
search", TPAMI 2011; faiss's ``IndexIVFFlat``): a query is compared with the lists'
centroids, then *exactly* with every patch of its ``nprobe`` nearest lists. The answer is
an upper bound of the exact distance, equal to it whenever the nearest patch lies in a
probed list (with ``nprobe`` = all lists it is the exact search). Speed and the AUROC
difference against the exact search: ``benchmarks/anomaly_search.py``.

Both searches fold the bank's squared norms into the matrix product (``[q, 1] . [b,
-|b|^2 / 2]``), so each bank chunk costs one product and one maximum.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DEFAULT_NPROBE",
    "LIST_SIZE",
    "SEARCHES",
    "BankIndex",
    "augmented",
    "exact",
    "leave_one_out",
]

SEARCHES = ("fast", "exact")
"""``fast``: inverted lists (:class:`BankIndex`); ``exact``: every bank patch."""
LIST_SIZE = 256
"""Bank patches per inverted list, on average (the number of lists is ``K / LIST_SIZE``)."""
DEFAULT_NPROBE = 6
"""Lists searched per query patch (chosen on the good training images, see the module)."""


def augmented(bank: np.ndarray) -> np.ndarray:
    """``float32[C + 1, K]``: the bank transposed, with ``-|b|^2 / 2`` as its last row, so
    that ``[q, 1] @ augmented(bank)`` is ``q.b - |b|^2 / 2`` (larger is nearer)."""
    bank = np.asarray(bank, np.float32)
    out = np.empty((bank.shape[1] + 1, len(bank)), np.float32)
    out[:-1] = bank.T
    out[-1] = -0.5 * np.einsum("ij,ij->i", bank, bank)
    return out


def _with_one(q: np.ndarray) -> np.ndarray:
    out = np.empty((len(q), q.shape[1] + 1), np.float32)
    out[:, :-1] = q
    out[:, -1] = 1.0
    return out


def exact(q: np.ndarray, aug: np.ndarray, chunk: int = 4096, rows: int = 4096) -> np.ndarray:
    """Exact squared Euclidean distance ``float32[N]`` from each row of ``q`` (``[N, C]``) to
    its nearest bank patch (``aug``: :func:`augmented` of the bank); memory stays
    ``rows x chunk`` floats whatever the sizes."""
    q = np.ascontiguousarray(q, np.float32)
    best = np.empty(len(q), np.float32)
    for r in range(0, len(q), rows):
        qa = _with_one(q[r : r + rows])
        top = np.full(len(qa), -np.inf, np.float32)
        for s in range(0, aug.shape[1], chunk):
            np.maximum(top, (qa @ aug[:, s : s + chunk]).max(1), out=top)
        best[r : r + rows] = top
    d = np.einsum("ij,ij->i", q, q) - 2.0 * best
    return np.maximum(d, 0.0)


def leave_one_out(
    x: np.ndarray,
    ids: np.ndarray,
    aug: np.ndarray,
    owner: np.ndarray,
    grid: tuple[int, int],
    chunk: int = 2048,
    rows: int = 1024,
) -> np.ndarray:
    """Distance maps ``float32[N, h, w]`` of standardised images ``x[N, P, C]`` (image ids
    ``ids``) to the bank without each image's own patches (``aug``: the bank's
    :func:`augmented`, ``owner``: each bank patch's image).

    ``rows // P`` images per matrix product, memory ``rows x chunk`` floats: the calibration
    of :func:`edge_tl.runtime.anomaly.build`, ``add`` and the streaming build."""
    n, p, c = x.shape
    per = max(1, rows // p)
    out = np.empty((n, p), np.float32)
    for a in range(0, n, per):
        q = x[a : a + per].reshape(-1, c)
        qa = np.empty((len(q), c + 1), np.float32)
        qa[:, :c], qa[:, c] = q, 1.0
        top = np.full(len(q), -np.inf, np.float32)
        for s in range(0, aug.shape[1], chunk):
            g = qa @ aug[:, s : s + chunk]
            own = owner[s : s + chunk]
            for j, image in enumerate(ids[a : a + per]):
                cols = np.flatnonzero(own == image)
                if len(cols):
                    g[j * p : (j + 1) * p, cols] = -np.inf
            np.maximum(top, g.max(1), out=top)
        d = np.einsum("ij,ij->i", q, q) - 2.0 * top
        out[a : a + per] = np.sqrt(np.maximum(d, 0.0)).reshape(-1, p)
    return out.reshape(n, *grid)


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Lloyd's k-means of ``x[K, C]`` into ``k`` lists: the list of each row, ``int64[K]``
    (started from ``k`` distinct random rows; a list left empty keeps its centre)."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), k, replace=False)].copy()
    xa = _with_one(x)
    for _ in range(iters):
        label = (xa @ augmented(centres)).argmax(1)
        counts = np.bincount(label, minlength=k)
        full = counts > 0
        centres[full] = _list_sums(label, x, k)[full] / counts[full, None]
    return (xa @ augmented(centres)).argmax(1)


def _list_sums(label: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """``float32[k, C]``: the sum of the rows of ``x`` in each list (zero for an empty one)."""
    order = np.argsort(label, kind="stable")
    starts = np.searchsorted(label[order], np.arange(k))
    nonempty = np.bincount(label, minlength=k) > 0
    out = np.zeros((k, x.shape[1]), np.float32)
    out[nonempty] = np.add.reduceat(x[order], starts[nonempty], axis=0)
    return out


class BankIndex:
    """A bank split into inverted lists by k-means, for the fast search (see the module).

    ``bank``: ``float[K, C]`` (the index keeps a float32 copy); about ``list_size``
    patches per list. Building is a few k-means passes over the bank (tens of ms for
    13,000 x 112), done once per bank.
    """

    def __init__(
        self, bank: np.ndarray, list_size: int = LIST_SIZE, iters: int = 8, seed: int = 0
    ) -> None:
        bank = np.asarray(bank, np.float32)
        k = max(1, round(len(bank) / list_size))
        label = _kmeans(bank, k, iters, seed) if k > 1 else np.zeros(len(bank), np.int64)
        order = np.argsort(label, kind="stable")
        counts = np.bincount(label, minlength=k)
        keep = counts > 0
        self.starts = np.concatenate([[0], np.cumsum(counts[keep])])
        sorted_bank = bank[order]
        self.centres = np.stack(
            [
                sorted_bank[a:b].mean(0)
                for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)
            ]
        ).astype(np.float32)
        self.aug = augmented(sorted_bank)
        self.centres_aug = augmented(self.centres)
        self.order = order  # row i of the sorted bank is row order[i] of the bank

    @property
    def lists(self) -> int:
        return len(self.centres)

    def nearest(self, q: np.ndarray, nprobe: int = DEFAULT_NPROBE, rows: int = 4096) -> np.ndarray:
        """Squared distance ``float32[N]`` from each row of ``q`` to the nearest patch of its
        ``nprobe`` nearest lists (>= the exact distance; equal with ``nprobe >= lists``).
        Queries are taken ``rows`` at a time (memory: ``rows x nprobe`` query copies)."""
        q = np.ascontiguousarray(q, np.float32)
        if nprobe >= self.lists:
            return exact(q, self.aug)
        best = np.empty(len(q), np.float32)
        for r in range(0, len(q), rows):
            best[r : r + rows] = self._best(_with_one(q[r : r + rows]), nprobe)
        d = np.einsum("ij,ij->i", q, q) - 2.0 * best
        return np.maximum(d, 0.0)

    def _best(self, qa: np.ndarray, nprobe: int) -> np.ndarray:
        """``max q.b - |b|^2 / 2`` over the probed lists, for augmented queries ``qa``."""
        near = qa @ self.centres_aug  # [N, lists], larger is nearer
        probe = np.argpartition(-near, nprobe - 1, axis=1)[:, :nprobe].ravel()
        # the (query, list) pairs sorted by list: per list one product over contiguous
        # rows (10 % faster at batch 1 than selecting each list's queries with a mask)
        order = np.argsort(probe, kind="stable")
        lists, who = probe[order], order // nprobe
        pairs = qa[who]
        cuts = (np.flatnonzero(np.diff(lists)) + 1).tolist()
        found = np.empty(len(order), np.float32)
        for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True):
            j = lists[a]
            found[a:b] = (pairs[a:b] @ self.aug[:, self.starts[j] : self.starts[j + 1]]).max(1)
        best = np.full(len(qa), -np.inf, np.float32)
        np.maximum.at(best, who, found)
        return best
