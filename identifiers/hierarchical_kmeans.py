"""v1..vM by hierarchical K-Means: the "w/o RQ-VAE tokens" ablation (``IdentifierConfig.quantizer=kmeans``).

As in DSI's semantically structured identifiers: level 1 splits the members of each K-Means cluster
k into at most C sub-clusters (K-Means of their residuals x - centroid[k]), level m splits the
members of each node (k, v1..v_{m-1}) the same way. A node with n <= C members gives each member
its own code (its own vector is the child centroid). New items walk down the tree: at each level
the nearest child centroid of the item's node. A node that received no member at fit time (possible
only for items assigned later) has no children; its items take code 0 there, and below it.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm


def _groups(prefix: np.ndarray):
    """Rows grouped by equal prefix rows: (unique prefixes (P, m), list of row-index arrays)."""
    keys, inverse = np.unique(prefix, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(keys)))[:-1]
    return keys, np.split(order, bounds)


class HierarchicalKMeans:
    """Per-level child centroids of every node, in residual space; fit, encode, reconstruct, state."""

    def __init__(self, *, M: int, codebook_size: int, max_iter: int = 100, n_init: int = 3, seed: int = 0):
        self.M, self.C, self.max_iter, self.n_init, self.seed = M, codebook_size, max_iter, n_init, seed
        # level m (0-based): parent prefixes (P_m, m+1) sorted, child slices, child centroids (sum c, D)
        self.parents: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        self.centroids: list[np.ndarray] = []
        self._index: list[dict] = []

    def _split(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members (n, D) -> (child centroids (c, D), labels (n,)) with c = min(C, n)."""
        n = r.shape[0]
        if n <= self.C:
            return r.astype(np.float32), np.arange(n, dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than C: duplicates
            km = KMeans(n_clusters=self.C, n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed).fit(r)
        return km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64)

    def fit(self, residuals: np.ndarray, k: np.ndarray, *, progress: bool = False) -> "HierarchicalKMeans":
        """Build the tree from residuals (n, D) and their K-Means codes k (n,)."""
        r = np.asarray(residuals, dtype=np.float32)
        prefix = np.asarray(k, dtype=np.int64)[:, None]                     # (n, 1)
        self.parents, self.offsets, self.centroids = [], [], []
        for m in tqdm(range(self.M), desc="hierarchical k-means", disable=not progress, leave=False):
            keys, members = _groups(prefix)
            codes = np.empty(r.shape[0], dtype=np.int64)
            offsets, cents = [0], []
            for rows in members:
                c, labels = self._split(r[rows])
                codes[rows] = labels
                cents.append(c)
                offsets.append(offsets[-1] + c.shape[0])
            self.parents.append(keys.astype(np.int64))
            self.offsets.append(np.asarray(offsets, dtype=np.int64))
            self.centroids.append(np.concatenate(cents).astype(np.float32))
            prefix = np.concatenate([prefix, codes[:, None]], axis=1)         # (n, m+2)
        self._build_index()
        return self

    def _build_index(self) -> None:
        self._index = [{tuple(p): i for i, p in enumerate(parents.tolist())} for parents in self.parents]

    def _walk(self, r: np.ndarray, k: np.ndarray):
        """Descend the tree: (codes (n, M), reconstruction (n, D) = the leaf child centroid)."""
        r = np.asarray(r, dtype=np.float32)
        prefix = np.asarray(k, dtype=np.int64)[:, None]
        codes = np.zeros((r.shape[0], self.M), dtype=np.int64)
        recon = np.zeros_like(r)
        for m in range(self.M):
            keys, members = _groups(prefix)
            for key, rows in zip(keys.tolist(), members):
                node = self._index[m].get(tuple(key))
                if node is None:                                          # never seen at fit time
                    continue
                c = self.centroids[m][self.offsets[m][node]:self.offsets[m][node + 1]]   # (c, D)
                d = (r[rows] ** 2).sum(1)[:, None] - 2 * r[rows] @ c.T + (c ** 2).sum(1)[None, :]
                best = np.argmin(d, axis=1)                                # (rows,)
                codes[rows, m] = best
                recon[rows] = c[best]
            prefix = np.concatenate([prefix, codes[:, m:m + 1]], axis=1)
        return codes, recon

    def encode(self, residuals: np.ndarray, k: np.ndarray) -> np.ndarray:
        """(n, D) residuals + (n,) K-Means codes -> (n, M) int64 codes v1..vM."""
        return self._walk(residuals, k)[0]

    def reconstruct(self, residuals: np.ndarray, k: np.ndarray) -> np.ndarray:
        """(n, D) -> the leaf centroid each residual falls into (n, D)."""
        return self._walk(residuals, k)[1]

    @property
    def codebooks(self) -> list[np.ndarray]:
        """M arrays (C, D): per level, the mean step from a node's centroid to its child with code c
        (the analogue of the RQ-VAE codebooks, for identifier-embedding init; unused codes are 0)."""
        out = []
        for m in range(self.M):
            total = np.zeros((self.C, self.centroids[m].shape[1]), dtype=np.float64)
            count = np.zeros(self.C)
            for node, parent in enumerate(self.parents[m].tolist()):
                c = self.centroids[m][self.offsets[m][node]:self.offsets[m][node + 1]]
                base = self._node_centroid(m, parent)
                total[:len(c)] += c - base
                count[:len(c)] += 1
            out.append((total / np.maximum(count, 1)[:, None]).astype(np.float32))
        return out

    def _node_centroid(self, m: int, parent: list[int]) -> np.ndarray:
        """Centroid of node ``parent`` (a prefix k, v1..v_m) in residual space; level-0 nodes are 0."""
        if m == 0:
            return np.zeros(self.centroids[0].shape[1], dtype=np.float32)
        node = self._index[m - 1][tuple(parent[:-1])]
        return self.centroids[m - 1][self.offsets[m - 1][node] + parent[-1]]

    # ---- persistence ---------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out = {"shape": np.asarray([self.M, self.C], dtype=np.int64)}
        for m in range(self.M):
            out[f"parents_{m}"], out[f"offsets_{m}"], out[f"centroids_{m}"] = \
                self.parents[m], self.offsets[m], self.centroids[m]
        return out

    @classmethod
    def from_state(cls, state: dict, *, max_iter: int = 100, n_init: int = 3, seed: int = 0) -> "HierarchicalKMeans":
        """Inverse of ``state``; raises ValueError when arrays are missing or inconsistent."""
        M, C = (int(v) for v in state["shape"])
        hk = cls(M=M, codebook_size=C, max_iter=max_iter, n_init=n_init, seed=seed)
        for m in range(M):
            parents, offsets, cents = state[f"parents_{m}"], state[f"offsets_{m}"], state[f"centroids_{m}"]
            if parents.ndim != 2 or parents.shape[1] != m + 1 or offsets.shape != (len(parents) + 1,) \
                    or cents.ndim != 2 or int(offsets[-1]) != cents.shape[0] or (np.diff(offsets) > C).any():
                raise ValueError(f"hierarchical k-means level {m} arrays are inconsistent "
                                 f"(parents {parents.shape}, offsets {offsets.shape}, centroids {cents.shape})")
            hk.parents.append(parents.astype(np.int64))
            hk.offsets.append(offsets.astype(np.int64))
            hk.centroids.append(cents.astype(np.float32))
        hk._build_index()
        return hk
