"""Item vectors of the hybrid scorer (``ace/newitems/hybrid.py``) in one text space, stored as float32,
int8 (a float32 scale per row) or product-quantisation codes; the cosine of query vectors to stored rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

STORAGES = ("float32", "int8", "pq")


class HybridError(ValueError):
    """Hybrid scoring cannot run with these inputs (no stored vectors, dimension mismatch, NaN); the message says why."""



class ItemVectorSet:
    """Item vectors of one text space, stored as float32, int8 (+ a float32 scale per row) or PQ codes.

    ``cosine(query_vecs (B, d), rows (B, P)) -> (B, P)``: query vectors against the decoded rows
    (re-normalised, so int8/PQ give a cosine too); rows < 0 give 0 (their log-prob is -inf)."""

    def __init__(self, ids: list[str], storage: str, dim: int, data: dict):
        self.ids = list(ids)
        self.storage = storage
        self.dim = int(dim)
        self.data = data
        self.row = {iid: i for i, iid in enumerate(self.ids)}

    # -- build
    @classmethod
    def build(cls, ids: list[str], vectors: np.ndarray, storage: str = "float32", *, pq_bytes: int = 48,
              seed: int = 0) -> "ItemVectorSet":
        vectors = check_vectors(vectors, "item vectors")
        if len(ids) != len(vectors):
            raise HybridError(f"{len(ids)} item ids but {len(vectors)} item vectors")
        n, d = vectors.shape
        if storage == "float32":
            data = {"vectors": vectors.astype(np.float32)}
        elif storage == "int8":
            scale = np.maximum(np.abs(vectors).max(1), 1e-12) / 127.0
            data = {"codes": np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8),
                    "scale": scale.astype(np.float32)}
        elif storage == "pq":
            if d % pq_bytes:
                raise HybridError(f"hybrid.pq_bytes={pq_bytes} must divide the vector dimension {d}")
            nbits = min(8, int(math.log2(max(n, 2))))
            import faiss
            pq = faiss.ProductQuantizer(d, pq_bytes, nbits)
            pq.cp.seed = seed
            pq.train(np.ascontiguousarray(vectors, dtype=np.float32))
            codes = pq.compute_codes(np.ascontiguousarray(vectors, dtype=np.float32))
            cent = faiss.vector_to_array(pq.centroids).reshape(pq_bytes, 2 ** nbits, d // pq_bytes)
            if nbits != 8:
                codes = np.stack([_unpack_codes(c, pq_bytes, nbits) for c in codes])
            data = {"codes": codes.astype(np.uint8), "centroids": cent.astype(np.float32)}
        else:
            raise HybridError(f"unknown item-vector storage {storage!r}; known: {', '.join(STORAGES)}")
        return cls(ids, storage, d, data)

    def bytes_per_item(self) -> float:
        """Bytes of the per-item arrays / N (the PQ codebook is shared and reported apart)."""
        per = {"float32": ["vectors"], "int8": ["codes", "scale"], "pq": ["codes"]}[self.storage]
        return sum(self.data[k].nbytes for k in per) / max(1, len(self.ids))

    def shared_bytes(self) -> int:
        return int(self.data["centroids"].nbytes) if self.storage == "pq" else 0

    # -- read
    def decode(self, rows: np.ndarray) -> np.ndarray:
        """(...,) row indices (>= 0) -> (..., d) float32 unit vectors."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.storage == "float32":
            out = self.data["vectors"][rows]
        elif self.storage == "int8":
            out = self.data["codes"][rows].astype(np.float32) * self.data["scale"][rows][..., None]
        else:
            cent = self.data["centroids"]                       # (m, ksub, dsub)
            codes = self.data["codes"][rows].astype(np.int64)    # (..., m)
            out = cent[np.arange(cent.shape[0]), codes].reshape(*rows.shape, self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)

    def cosine(self, query_vecs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        query_vecs = np.asarray(query_vecs, dtype=np.float32)
        if query_vecs.ndim != 2 or query_vecs.shape[1] != self.dim:
            raise HybridError(f"query vectors have shape {query_vecs.shape}, the stored item vectors have dimension "
                              f"{self.dim}: the run's item vectors come from another encoder; rebuild them "
                              f"(pipeline stage hybrid)")
        rows = np.asarray(rows, dtype=np.int64)
        vec = self.decode(np.maximum(rows, 0))                  # (B, P, d)
        cos = np.einsum("bpd,bd->bp", vec, query_vecs)
        return np.where(rows >= 0, cos, 0.0)    # padded slots: their log-prob is -inf already

    def rows_of(self, item_ids) -> np.ndarray:
        missing = [i for i in item_ids if i is not None and i not in self.row]
        if missing:
            raise HybridError(f"no hybrid item vector for {len(missing)} item(s), e.g. {missing[:5]}")
        return np.asarray([-1 if i is None else self.row[i] for i in item_ids], dtype=np.int64)

    # -- files
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "vectors.npz", **self.data)
        (folder / "item_ids.json").write_text(json.dumps(self.ids))

    @classmethod
    def load(cls, folder: Path, storage: str, dim: int) -> "ItemVectorSet":
        with np.load(folder / "vectors.npz") as z:
            data = {k: z[k] for k in z.files}
        ids = json.loads((folder / "item_ids.json").read_text())
        out = cls(ids, storage, dim, data)
        n = len(next(iter(data.values())))
        if n != len(ids):
            raise HybridError(f"{folder}: {len(ids)} item ids but {n} stored item vectors")
        return out


def _unpack_codes(packed: np.ndarray, m: int, nbits: int) -> np.ndarray:
    bits = np.unpackbits(packed, bitorder="little")[: m * nbits].reshape(m, nbits)
    return (bits * (1 << np.arange(nbits))).sum(1).astype(np.uint8)


def check_vectors(vectors, what: str) -> np.ndarray:
    from ace.arrays import check_matrix

    arr = check_matrix(np.asarray(vectors, dtype=np.float32), name=what, error=HybridError)
    if arr.shape[0] == 0:
        raise HybridError(f"{what} must be a non-empty (N, D) array, got shape {arr.shape}")
    zero = np.where(np.linalg.norm(arr, axis=1) == 0)[0]
    if len(zero):
        raise HybridError(f"{what}: {len(zero)} row(s) are all zeros (rows {zero[:5].tolist()})")
    return arr
