"""Synthetic data shared by tests/test_fallback.py and tests/test_baselines.py (no model download)."""
from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class TableEncoder:
    """A 'text encoder' that looks texts up in a table; unknown texts are an error."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table
        self.dim = len(next(iter(table.values())))

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise KeyError(f"TableEncoder has no vector for {missing[:2]}")
        return unit(np.stack([self.table[t] for t in texts])) if texts else np.zeros((0, self.dim), np.float32)


def synthetic_task(*, n_items: int = 60, item_dim: int = 12, text_dim: int = 16, queries_per_item: int = 4,
                   noise: float = 0.2, seed: int = 0):
    """Items z_i (unit, item_dim); query texts whose text vectors are M z_i + noise (text_dim).

    Returns (item_ids, item_emb, encoder, train_pairs, test_pairs); a query tower has to learn
    the inverse of the random mixing M to retrieve the right item.
    """
    rng = np.random.default_rng(seed)
    item_ids = [f"item{i}" for i in range(n_items)]
    z = unit(rng.standard_normal((n_items, item_dim)))
    mix = rng.standard_normal((text_dim, item_dim))
    table, train, test = {}, [], []
    for i, iid in enumerate(item_ids):
        for j in range(queries_per_item):
            text = f"query {j} about {iid}"
            table[text] = mix @ z[i] + noise * rng.standard_normal(text_dim)
            (train if j < queries_per_item - 1 else test).append((iid, text))
    return item_ids, z, TableEncoder(table), train, test


def clustered_embeddings(*, n: int = 200, dim: int = 32, clusters: int = 10, spread: float = 0.3, seed: int = 0):
    """Unit vectors in ``clusters`` tight groups (so nearest neighbours are well defined)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    return unit(centres[labels] + spread * rng.standard_normal((n, dim)))
