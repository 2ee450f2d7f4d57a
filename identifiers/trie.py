"""Prefix trie over identifiers (k, v1..vM, u): allowed next codes, identifier <-> item.

Two forms:

- ``FlatTrie``: immutable numpy arrays (the form the decoder walks), built vectorised from an
  (N, L) code matrix in O(N log N) - 1M identifiers take about a second.
- ``IdentifierTrie``: the mutable trie the tokenizer owns. Rows are items in insertion order;
  ``add`` appends, ``remove`` deletes rows (later rows shift up), ``flat()`` returns the
  ``FlatTrie`` over the current rows (rebuilt lazily after changes). Item id -> row lives in a
  marisa-trie (compact for millions of ids) plus a small dict for ids added since the last build.

FlatTrie layout (all int64; see docs/ARCHITECTURE.md "Identifiers"):
    node 0 = root (depth 0); children of a depth-d node are depth d+1 nodes, edge codes of level d
    child_start[node], child_count[node] -> slice of child_code / child_node
    child_code[e] sorted within each node's slice; child_node[e] = node reached by edge e
    leaf_item[node] = row index for depth-L nodes, -1 otherwise
Nodes are numbered breadth-first in lexicographic order, so edge e leads to node e + 1 and the
key ``parent * S + code`` (S = max level size) is globally sorted over edges: this lets
``FlatTrie.child`` and ``FlatTrie.lookup_rows`` walk many identifiers at once with searchsorted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import marisa_trie
import numpy as np


class TrieError(ValueError):
    """Invalid identifiers, prefixes or item ids given to a trie; the message names the problem."""


def _check_codes(codes, level_sizes, *, what: str = "codes") -> np.ndarray:
    """Validate an (N, L) integer code matrix against ``level_sizes``; return it as int64."""
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise TrieError(f"{what} must be a 2-D (N, L) array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TrieError(f"{what} must be integers, got dtype {arr.dtype}")
    L = len(level_sizes)
    if arr.shape[1] != L:
        raise TrieError(f"{what} has {arr.shape[1]} columns but level_sizes has {L} levels")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        sizes = np.asarray(level_sizes, dtype=np.int64)
        bad = (arr < 0) | (arr >= sizes[None, :])
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise TrieError(f"{what} row {row} level {col} has code {arr[row, col]} outside "
                            f"[0, {sizes[col]})")
    return arr


@dataclass(eq=False)
class FlatTrie:
    """Array form of the identifier trie (see module docstring for the layout)."""

    child_start: np.ndarray  # (num_nodes,)
    child_count: np.ndarray  # (num_nodes,)
    child_code: np.ndarray   # (num_nodes - 1,)
    child_node: np.ndarray   # (num_nodes - 1,)
    leaf_item: np.ndarray    # (num_nodes,)
    length: int              # L = number of levels
    level_sizes: tuple[int, ...]
    _edge_key: np.ndarray | None = field(default=None, repr=False)
    _node_depth: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_codes(cls, codes, level_sizes, items=None) -> "FlatTrie":
        """Build from int (N, L) codes; ``items`` (N,) are the leaf values (default: row index)."""
        level_sizes = tuple(int(s) for s in level_sizes)
        if not level_sizes or min(level_sizes) < 1:
            raise TrieError(f"level_sizes must be a non-empty list of positive ints, got {level_sizes}")
        codes = _check_codes(codes, level_sizes)
        N, L = codes.shape
        items = np.arange(N, dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
        if items.shape != (N,):
            raise TrieError(f"items must have shape ({N},), got {items.shape}")
        if N == 0:
            z = np.zeros(0, dtype=np.int64)
            return cls(child_start=np.zeros(1, np.int64), child_count=np.zeros(1, np.int64),
                       child_code=z, child_node=z.copy(), leaf_item=np.full(1, -1, np.int64),
                       length=L, level_sizes=level_sizes)
        order = np.lexsort(codes.T[::-1])                     # lexicographic row order
        srt = codes[order]                                    # (N, L)
        # first level at which row i differs from row i-1 (row 0: level 0; equal rows: L)
        neq = srt[1:] != srt[:-1]                             # (N-1, L)
        first_diff = np.where(neq.any(1), neq.argmax(1), L)
        if (first_diff == L).any():
            i = int(np.flatnonzero(first_diff == L)[0])
            a, b = sorted((int(order[i]), int(order[i + 1])))
            raise TrieError(f"duplicate identifier {srt[i + 1].tolist()} at rows {a} and {b}")
        first_diff = np.concatenate([[0], first_diff])        # (N,)

        parent = np.zeros(N, dtype=np.int64)                  # node of each row at depth d-1
        parents, codes_e, nodes_per_depth = [], [], []
        next_id = 1
        for d in range(1, L + 1):
            new = first_diff < d                              # row starts a new depth-d node
            n_new = int(new.sum())
            node = next_id + np.cumsum(new) - 1               # (N,) depth-d node of each row
            parents.append(parent[new])
            codes_e.append(srt[new, d - 1])
            nodes_per_depth.append(n_new)
            parent = node
            next_id += n_new
        num_nodes = next_id
        edge_parent = np.concatenate(parents)                 # (num_nodes-1,) sorted (BFS order)
        child_code = np.concatenate(codes_e)
        child_node = np.arange(1, num_nodes, dtype=np.int64)
        child_count = np.bincount(edge_parent, minlength=num_nodes).astype(np.int64)
        child_start = np.zeros(num_nodes, dtype=np.int64)
        np.cumsum(child_count[:-1], out=child_start[1:])
        leaf_item = np.full(num_nodes, -1, dtype=np.int64)
        leaf_item[parent] = items[order]                      # parent = depth-L node per row
        depth = np.repeat(np.arange(L + 1, dtype=np.int64), [1] + nodes_per_depth)
        return cls(child_start=child_start, child_count=child_count, child_code=child_code,
                   child_node=child_node, leaf_item=leaf_item, length=L, level_sizes=level_sizes,
                   _node_depth=depth)

    @classmethod
    def forest(cls, tries: "list[FlatTrie]") -> "tuple[FlatTrie, np.ndarray]":
        """Several tries of one identifier layout side by side in one FlatTrie (node and edge ids offset),
        and the root node of each (T,). For decoding queries that search different tries in one batch
        (each query starts at its own root); ``walk``/``lookup`` of the result see the first trie only."""
        if not tries:
            raise TrieError("forest() needs at least one trie")
        sizes = {t.level_sizes for t in tries}
        if len(sizes) != 1:
            raise TrieError(f"forest() needs tries of one identifier layout, got level sizes {sorted(sizes)}")
        nodes = np.cumsum([0] + [t.num_nodes for t in tries])
        edges = np.cumsum([0] + [t.child_code.shape[0] for t in tries])
        return cls(child_start=np.concatenate([t.child_start + e for t, e in zip(tries, edges)]),
                   child_count=np.concatenate([t.child_count for t in tries]),
                   child_code=np.concatenate([t.child_code for t in tries]),
                   child_node=np.concatenate([t.child_node + n for t, n in zip(tries, nodes)]),
                   leaf_item=np.concatenate([t.leaf_item for t in tries]),
                   length=tries[0].length, level_sizes=tries[0].level_sizes), nodes[:-1].astype(np.int64)

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return int(self.child_start.shape[0])

    @property
    def num_items(self) -> int:
        return int((self.leaf_item >= 0).sum())

    @property
    def node_depth(self) -> np.ndarray:
        """(num_nodes,) depth of each node (root 0, leaves L)."""
        if self._node_depth is None:
            depth = np.zeros(self.num_nodes, dtype=np.int64)
            parent = np.repeat(np.arange(self.num_nodes, dtype=np.int64), self.child_count)
            for _ in range(self.length):                      # converges after L passes
                depth[self.child_node] = depth[parent] + 1
            self._node_depth = depth
        return self._node_depth

    @property
    def edge_key(self) -> np.ndarray:
        """(num_edges,) ``parent * S + code``; globally sorted (S = max level size)."""
        if self._edge_key is None:
            S = max(self.level_sizes)
            parent = np.repeat(np.arange(self.num_nodes, dtype=np.int64), self.child_count)
            self._edge_key = parent * S + self.child_code
        return self._edge_key

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, nodes) of the children of one node, codes sorted."""
        s, c = int(self.child_start[node]), int(self.child_count[node])
        return self.child_code[s:s + c], self.child_node[s:s + c]

    def child(self, nodes, codes) -> np.ndarray:
        """Vectorised step: node reached from ``nodes`` by ``codes`` (same shape), -1 if none."""
        nodes = np.asarray(nodes, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        nodes, codes = np.broadcast_arrays(nodes, codes)
        out = np.full(nodes.shape, -1, dtype=np.int64)
        ok = (nodes >= 0) & (codes >= 0) & (codes < max(self.level_sizes))
        if not ok.any() or self.edge_key.size == 0:
            return out
        key = nodes[ok] * max(self.level_sizes) + codes[ok]
        pos = np.searchsorted(self.edge_key, key)
        pos_c = np.minimum(pos, self.edge_key.size - 1)
        hit = self.edge_key[pos_c] == key
        out[ok] = np.where(hit, self.child_node[pos_c], -1)
        return out

    def walk(self, prefix) -> int:
        """Node reached by ``prefix`` (a sequence of codes), -1 if it is not in the trie."""
        node = 0
        for code in prefix:
            codes, kids = self.children(node)
            j = np.searchsorted(codes, code)
            if j >= codes.size or codes[j] != code:
                return -1
            node = int(kids[j])
        return node

    def allowed_next(self, prefix) -> np.ndarray:
        """Sorted codes that may follow ``prefix`` (empty if the prefix is absent or complete)."""
        prefix = list(prefix)
        if len(prefix) >= self.length:
            return np.zeros(0, dtype=np.int64)
        node = self.walk(prefix)
        if node < 0:
            return np.zeros(0, dtype=np.int64)
        return self.children(node)[0].copy()

    def lookup_rows(self, codes) -> np.ndarray:
        """(n, L) identifiers -> (n,) leaf items, -1 where the identifier is not in the trie."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.length:
            raise TrieError(f"lookup_rows expects (n, {self.length}) codes, got shape {codes.shape}")
        node = np.zeros(codes.shape[0], dtype=np.int64)
        for d in range(self.length):
            node = self.child(node, codes[:, d])
        return np.where(node >= 0, self.leaf_item[np.maximum(node, 0)], -1)

    def lookup(self, codes) -> int:
        """One identifier -> leaf item, -1 if absent."""
        return int(self.lookup_rows(np.asarray(codes, dtype=np.int64)[None, :])[0])

    def __len__(self) -> int:
        return self.num_items

    def save(self, path: str | Path) -> None:
        np.savez(path, child_start=self.child_start, child_count=self.child_count,
                 child_code=self.child_code, child_node=self.child_node, leaf_item=self.leaf_item,
                 length=np.int64(self.length), level_sizes=np.asarray(self.level_sizes, np.int64))

    @classmethod
    def load(cls, path: str | Path) -> "FlatTrie":
        try:
            with np.load(path) as z:
                return cls(child_start=z["child_start"], child_count=z["child_count"],
                           child_code=z["child_code"], child_node=z["child_node"],
                           leaf_item=z["leaf_item"], length=int(z["length"]),
                           level_sizes=tuple(int(s) for s in z["level_sizes"]))
        except (OSError, KeyError, ValueError) as exc:
            raise TrieError(f"cannot read FlatTrie from {path}: {exc}") from None


def _check_item_id(item, position: int) -> None:
    """Item ids are keys of a marisa trie: UTF-8 encodable (no lone surrogates) and free of NUL, which
    marisa stores but can never look up again."""
    if not isinstance(item, str):
        raise TrieError(f"item id at position {position} must be a str, got {type(item).__name__}")
    if "\0" in item:
        raise TrieError(f"item id {item!r} at position {position} contains a NUL character")
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        raise TrieError(f"item id {item!r} at position {position} is not well-formed Unicode "
                        f"(lone surrogate)") from None


class IdentifierTrie:
    """Mutable identifier trie: rows (codes, item id) in insertion order, unique on both."""

    def __init__(self, *, level_sizes):
        self.level_sizes = tuple(int(s) for s in level_sizes)
        if not self.level_sizes or min(self.level_sizes) < 1:
            raise TrieError(f"level_sizes must be a non-empty list of positive ints, got {level_sizes}")
        self.length = len(self.level_sizes)
        self._codes = np.zeros((0, self.length), dtype=np.int64)   # (capacity, L)
        self._n = 0
        self._item_ids: list[str] = []
        self._flat: FlatTrie | None = None     # covers rows [0, _n_flat)
        self._n_flat = 0
        self._id_trie = marisa_trie.Trie([])   # item id -> marisa key -> row (rows [0, _n_indexed))
        self._id_row = np.zeros(0, dtype=np.int64)
        self._n_indexed = 0
        self._pending_ids: dict[str, int] = {}       # rows [_n_indexed, _n)
        self._pending_codes: dict[bytes, int] = {}   # rows [_n_flat, _n)

    @classmethod
    def from_codes(cls, codes, item_ids, level_sizes) -> "IdentifierTrie":
        """Build in one vectorised pass from (N, L) codes and N unique item ids."""
        trie = cls(level_sizes=level_sizes)
        trie.add(codes, item_ids)
        return trie

    # ---- state ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def codes(self) -> np.ndarray:
        """(N, L) int64 identifiers; row i belongs to ``item_ids[i]`` (read-only view)."""
        view = self._codes[:self._n]
        view.flags.writeable = False
        return view

    @property
    def item_ids(self) -> list[str]:
        """Item ids by row (the trie's own list, not a copy: do not mutate it)."""
        return self._item_ids

    def __contains__(self, item_id) -> bool:
        return self.row_of(item_id) >= 0

    def row_of(self, item_id: str) -> int:
        """Row of ``item_id``, -1 if absent."""
        row = self._pending_ids.get(item_id)
        if row is not None:
            return row
        key = self._id_trie.get(item_id) if isinstance(item_id, str) else None
        return -1 if key is None else int(self._id_row[key])

    def _reindex_ids(self) -> None:
        self._id_trie = marisa_trie.Trie(self._item_ids)
        self._id_row = np.empty(len(self._item_ids), dtype=np.int64)
        self._id_row[[self._id_trie[i] for i in self._item_ids]] = np.arange(len(self._item_ids))
        self._n_indexed = self._n
        self._pending_ids = {}

    def _key(self, row_codes: np.ndarray) -> bytes:
        return np.ascontiguousarray(row_codes, dtype=np.int64).tobytes()

    # ---- mutation ------------------------------------------------------------------------
    def add(self, codes, item_ids) -> np.ndarray:
        """Append items; ``codes`` (L,) or (n, L). Returns their rows. Rejects any duplicate."""
        codes = np.asarray(codes)
        if codes.ndim == 1:
            codes = codes[None, :]
        if isinstance(item_ids, str):
            item_ids = [item_ids]
        item_ids = list(item_ids)
        codes = _check_codes(codes, self.level_sizes)
        n = codes.shape[0]
        if len(item_ids) != n:
            raise TrieError(f"got {n} identifiers but {len(item_ids)} item ids")
        for i, item in enumerate(item_ids):
            _check_item_id(item, i)
        if len(set(item_ids)) != n:
            seen, dup = set(), None
            for item in item_ids:
                if item in seen:
                    dup = item
                    break
                seen.add(item)
            raise TrieError(f"duplicate item id {dup!r} in the items to add")
        clash = next((i for i in item_ids if i in self), None)
        if clash is not None:
            raise TrieError(f"item id {clash!r} is already in the trie (row {self.row_of(clash)})")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        # identifiers must be new and unique among themselves
        batch_flat = FlatTrie.from_codes(codes, self.level_sizes)  # raises on internal duplicates
        existing = self.lookup_rows(codes)
        if (existing >= 0).any():
            i = int(np.flatnonzero(existing >= 0)[0])
            raise TrieError(f"identifier {codes[i].tolist()} of {item_ids[i]!r} already belongs to "
                            f"{self._item_ids[existing[i]]!r}")
        if self._n + n > self._codes.shape[0]:
            grown = np.zeros((max(2 * self._codes.shape[0], self._n + n), self.length), np.int64)
            grown[:self._n] = self._codes[:self._n]
            self._codes = grown
        rows = np.arange(self._n, self._n + n, dtype=np.int64)
        self._codes[self._n:self._n + n] = codes
        self._item_ids.extend(item_ids)
        self._n += n
        if n == self._n:                                        # first batch: reuse its trie
            self._flat, self._n_flat = batch_flat, n
        elif self._n - self._n_flat > max(4096, self._n_flat // 8):
            self._flat = None                                   # rebuild lazily, all at once
        else:
            for r in rows:
                self._pending_codes[self._key(self._codes[r])] = int(r)
        if self._n - self._n_indexed > max(4096, self._n_indexed // 8):
            self._reindex_ids()
        else:
            self._pending_ids.update(zip(item_ids, rows.tolist()))
        return rows

    def remove(self, item_ids) -> np.ndarray:
        """Delete items (their identifiers never match again); later rows shift up. Returns old rows."""
        if isinstance(item_ids, str):
            item_ids = [item_ids]
        rows = []
        for item in item_ids:
            r = self.row_of(item)
            if r < 0:
                raise TrieError(f"unknown item id {item!r}: not in the trie")
            rows.append(r)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        keep = np.ones(self._n, dtype=bool)
        keep[rows] = False
        self._codes = self._codes[:self._n][keep].copy()
        self._item_ids = [i for i, k in zip(self._item_ids, keep) if k]
        self._n = len(self._item_ids)
        self._flat, self._n_flat, self._pending_codes = None, 0, {}
        self._reindex_ids()
        return rows

    # ---- lookups -------------------------------------------------------------------------
    def flat(self) -> FlatTrie:
        """The FlatTrie over all current rows (leaf_item = row index); cached until a change."""
        if self._flat is None or self._n_flat != self._n:
            self._flat = FlatTrie.from_codes(self._codes[:self._n], self.level_sizes)
            self._n_flat = self._n
            self._pending_codes = {}
        return self._flat

    def lookup_rows(self, codes) -> np.ndarray:
        """(n, L) identifiers -> (n,) rows, -1 where absent."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.length:
            raise TrieError(f"expected (n, {self.length}) identifiers, got shape {codes.shape}")
        if self._flat is None and self._n:
            self.flat()
        out = (self._flat.lookup_rows(codes) if self._flat is not None
               else np.full(codes.shape[0], -1, dtype=np.int64))
        if self._pending_codes:
            for i in np.flatnonzero(out < 0):
                out[i] = self._pending_codes.get(self._key(codes[i]), -1)
        return out

    def lookup(self, codes) -> str | None:
        """One identifier (k, v1..vM, u) -> item id, or None if no current item has it."""
        codes = np.asarray(codes)
        if codes.shape != (self.length,):
            raise TrieError(f"lookup expects {self.length} codes, got shape {codes.shape}")
        row = int(self.lookup_rows(codes[None, :])[0])
        return None if row < 0 else self._item_ids[row]

    def allowed_next(self, prefix) -> np.ndarray:
        """Sorted int64 codes that extend ``prefix`` towards some current identifier."""
        prefix = [int(c) for c in np.asarray(prefix, dtype=np.int64).reshape(-1)]
        if len(prefix) >= self.length:
            raise TrieError(f"prefix of length {len(prefix)} has no next level (identifiers have "
                            f"{self.length} levels)")
        return self.flat().allowed_next(prefix)

    def save(self, folder: str | Path) -> None:
        """Write ``codes.npy``, ``item_ids.marisa`` (+ row order) and ``flat_trie.npz``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self._n_indexed != self._n:
            self._reindex_ids()
        np.save(folder / "codes.npy", self._codes[:self._n])
        self._id_trie.save(str(folder / "item_ids.marisa"))
        np.save(folder / "item_id_rows.npy", self._id_row)
        self.flat().save(folder / "flat_trie.npz")

    @classmethod
    def load(cls, folder: str | Path, level_sizes) -> "IdentifierTrie":
        folder = Path(folder)
        try:
            codes = np.load(folder / "codes.npy")
            id_row = np.load(folder / "item_id_rows.npy")
            id_trie = marisa_trie.Trie()
            id_trie.load(str(folder / "item_ids.marisa"))
        except (OSError, ValueError, EOFError) as exc:
            raise TrieError(f"cannot read the identifier trie in {folder}: {exc}") from None
        if id_row.shape != (len(id_trie),) or codes.shape[0] != len(id_trie):
            raise TrieError(f"identifier trie in {folder} is inconsistent: {codes.shape[0]} codes, "
                            f"{len(id_trie)} item ids, {id_row.shape[0]} rows")
        item_ids = [None] * len(id_trie)
        for key, kid in id_trie.iteritems():
            item_ids[id_row[kid]] = key
        if any(i is None for i in item_ids):
            raise TrieError(f"identifier trie in {folder} is inconsistent: rows do not cover all items")
        trie = cls(level_sizes=level_sizes)
        codes = _check_codes(codes, trie.level_sizes, what=f"codes in {folder}")
        trie._codes, trie._n, trie._item_ids = codes.copy(), codes.shape[0], item_ids
        trie._id_trie, trie._id_row, trie._n_indexed = id_trie, id_row, codes.shape[0]
        flat_path = folder / "flat_trie.npz"
        trie._flat = FlatTrie.load(flat_path) if flat_path.exists() else None
        if trie._flat is not None and trie._flat.num_items != trie._n:
            raise TrieError(f"{flat_path} holds {trie._flat.num_items} identifiers, codes.npy {trie._n}")
        trie._n_flat = trie._n if trie._flat is not None else 0
        return trie
