"""k of the identifier: MiniBatch K-Means on L2-normalised embeddings, batched fit and predict."""
from __future__ import annotations

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from tqdm.auto import tqdm

from .inputs import l2_normalise


def sample_rows(n: int, cap: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded random subsample of at most ``cap`` rows (all if n <= cap)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


class KMeansClusterer:
    """Spherical-input MiniBatch K-Means: fit on a (sub)sample, predict in chunks."""

    def __init__(self, *, K: int, batch_size: int = 4096, max_iter: int = 100, n_init: int = 3,
                 seed: int = 0, chunk: int = 65_536):
        self.K, self.batch_size, self.max_iter, self.n_init = K, batch_size, max_iter, n_init
        self.seed, self.chunk = seed, chunk
        self.centroids: np.ndarray | None = None            # (K, D) float32

    def fit(self, x_normed: np.ndarray) -> "KMeansClusterer":
        """Fit on already L2-normalised rows (the caller subsamples)."""
        if x_normed.shape[0] < self.K:
            raise ValueError(f"K-Means needs at least K={self.K} rows, got {x_normed.shape[0]}")
        km = MiniBatchKMeans(n_clusters=self.K, batch_size=min(self.batch_size, x_normed.shape[0]),
                             max_iter=self.max_iter, n_init=self.n_init, random_state=self.seed,
                             reassignment_ratio=0.01)
        km.fit(x_normed)
        self.centroids = km.cluster_centers_.astype(np.float32)
        return self

    def predict(self, x, *, normalise: bool = True, progress: bool = False) -> np.ndarray:
        """(N, D) -> (N,) int64 nearest centroid, ``chunk`` rows at a time."""
        c = self.centroids                                   # (K, D)
        half_sq = 0.5 * (c * c).sum(1)                       # (K,)
        out = np.empty(x.shape[0], dtype=np.int64)
        starts = range(0, x.shape[0], self.chunk)
        for s in tqdm(starts, desc="k-means predict", disable=not progress, leave=False):
            block = x[s:s + self.chunk]
            block = l2_normalise(block) if normalise else np.asarray(block, np.float32)
            out[s:s + block.shape[0]] = np.argmax(block @ c.T - half_sq, axis=1)   # (B, K) -> (B,)
        return out
