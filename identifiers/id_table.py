"""u of the identifier: the ID table ("search and count") over (k, v1..vM) prefixes.

The first item with a given prefix gets u = 0, the next u = 1, and so on, in input order. Counters
only grow: a removed item's u is never handed out again, so a removed identifier never returns.
"""
from __future__ import annotations

import numpy as np


class IdTableError(ValueError):
    """A prefix ran out of u values, or prefixes are malformed."""


class IdTable:
    """Sorted prefix keys (mixed-radix int64) with the next free u of each prefix."""

    def __init__(self, *, prefix_sizes, max_u: int):
        self.prefix_sizes = tuple(int(s) for s in prefix_sizes)     # (K, C_1..C_M)
        self.max_u = int(max_u)
        if np.prod([float(s) for s in self.prefix_sizes]) >= 2 ** 62:
            raise IdTableError(f"prefix space {self.prefix_sizes} is too large for int64 keys")
        radix = np.ones(len(self.prefix_sizes), dtype=np.int64)
        for i in range(len(self.prefix_sizes) - 2, -1, -1):
            radix[i] = radix[i + 1] * self.prefix_sizes[i + 1]
        self._radix = radix
        self.keys = np.zeros(0, dtype=np.int64)       # sorted prefix keys seen so far
        self.next_u = np.zeros(0, dtype=np.int64)     # next free u per key

    def __len__(self) -> int:
        return int(self.keys.size)

    def key(self, prefixes: np.ndarray) -> np.ndarray:
        """(n, M+1) prefixes -> (n,) int64 keys."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        if prefixes.ndim != 2 or prefixes.shape[1] != len(self.prefix_sizes):
            raise IdTableError(f"prefixes must have shape (n, {len(self.prefix_sizes)}), got {prefixes.shape}")
        sizes = np.asarray(self.prefix_sizes)
        if ((prefixes < 0) | (prefixes >= sizes)).any():
            raise IdTableError(f"prefix codes out of range for level sizes {self.prefix_sizes}")
        return prefixes @ self._radix

    def assign(self, prefixes: np.ndarray) -> np.ndarray:
        """(n, M+1) prefixes -> (n,) u, counting on from what each prefix already holds."""
        keys = self.key(prefixes)
        if keys.size == 0:
            return np.zeros(0, dtype=np.int64)
        uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
        order = np.argsort(inv, kind="stable")                       # input order within a prefix
        group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(keys.size, dtype=np.int64)
        rank[order] = np.arange(keys.size) - group_start[inv[order]]
        pos = np.searchsorted(self.keys, uniq)
        found = (pos < self.keys.size) & (self.keys[np.minimum(pos, max(self.keys.size - 1, 0))] == uniq) \
            if self.keys.size else np.zeros(uniq.size, dtype=bool)
        base = np.zeros(uniq.size, dtype=np.int64)
        base[found] = self.next_u[pos[found]]
        u = base[inv] + rank
        if (u >= self.max_u).any():
            i = int(np.argmax(u))
            raise IdTableError(f"prefix {np.asarray(prefixes)[i].tolist()} needs u = {int(u[i])} but the u "
                               f"vocabulary has max_u = {self.max_u}; raise max_u (or K / codebook sizes)")
        new_next = base + counts
        self.next_u[pos[found]] = new_next[found]
        if (~found).any():
            keys_all = np.concatenate([self.keys, uniq[~found]])
            next_all = np.concatenate([self.next_u, new_next[~found]])
            srt = np.argsort(keys_all, kind="stable")
            self.keys, self.next_u = keys_all[srt], next_all[srt]
        return u

    def reserve(self, prefixes: np.ndarray, u: np.ndarray) -> None:
        """Mark (prefix, u) pairs assigned earlier (e.g. restored from a store) as taken: next u > each."""
        keys = self.key(prefixes)
        u = np.asarray(u, dtype=np.int64).reshape(-1)
        if u.shape != keys.shape or (u < 0).any() or (u >= self.max_u).any():
            raise IdTableError(f"u must be {keys.size} values in [0, {self.max_u}), got {u.tolist()[:10]}")
        if keys.size == 0:
            return
        order = np.lexsort((u, keys))
        keys, u = keys[order], u[order]
        last = np.r_[keys[1:] != keys[:-1], True]                   # max u per key comes last
        uniq, need = keys[last], u[last] + 1
        keys_all = np.concatenate([self.keys, uniq])
        next_all = np.concatenate([self.next_u, need])
        srt = np.lexsort((-next_all, keys_all))                       # per key, the largest next_u first
        keys_all, next_all = keys_all[srt], next_all[srt]
        first = np.r_[True, keys_all[1:] != keys_all[:-1]]
        self.keys, self.next_u = keys_all[first], next_all[first]

    def state(self) -> dict:
        return {"keys": self.keys, "next_u": self.next_u,
                "prefix_sizes": np.asarray(self.prefix_sizes, np.int64), "max_u": np.int64(self.max_u)}

    @classmethod
    def from_state(cls, state: dict) -> "IdTable":
        table = cls(prefix_sizes=[int(s) for s in state["prefix_sizes"]], max_u=int(state["max_u"]))
        keys, nxt = np.asarray(state["keys"], np.int64), np.asarray(state["next_u"], np.int64)
        if keys.shape != nxt.shape or keys.ndim != 1 or (keys.size > 1 and (np.diff(keys) <= 0).any()):
            raise IdTableError("ID table state is inconsistent (keys unsorted or length mismatch)")
        table.keys, table.next_u = keys, nxt
        return table
