"""Dual-tower baselines of the benchmark, on the caption-proxy split and the same item embeddings.

- ``dt_zero_shot``: text encoder on the test queries vs the item (document) embeddings;
- ``dt_doc_plus_queries``: item vector = normalised mean of the document embedding and the
  embeddings of its generated (training) queries;
- ``dt_trained``: the query tower of ``ace.newitems.query_tower`` (frozen text encoder + projection
  trained with InfoNCE on the generated queries) vs the document embeddings.

Search backends: ``"torch"`` (exact matmul), ``"faiss_flat"`` (IndexFlatIP, exact) and
``"faiss_hnsw"`` (IndexHNSWFlat, inner product, approximate). Every baseline returns rankings
(item ids per test query, best first) for ``ace.metrics.retrieval_metrics`` with ``query_targets``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ace.data.importers import ProxySplit
from ace.arrays import resolve_device, unit_rows
from ace.newitems.query_tower import QueryTower, QueryTowerConfig, TextTower, item_plus_query_vectors

BACKENDS = ("torch", "faiss_flat", "faiss_hnsw")


class BaselineError(ValueError):
    """Bad input to a baseline (unknown backend, shape mismatch, empty split)."""


@dataclass
class SplitEmbeddings:
    """Text embeddings of a caption-proxy split, computed once and shared by every baseline."""
    documents: np.ndarray     # (N, D), row i <-> split.item_ids[i]
    train_queries: np.ndarray  # (P, D), row j <-> split.train_queries[j]
    test_queries: np.ndarray   # (T, D), row j <-> split.test_queries[j]

    def check(self, split: ProxySplit) -> None:
        for name, arr, n in (("documents", self.documents, len(split.item_ids)),
                             ("train_queries", self.train_queries, len(split.train_queries)),
                             ("test_queries", self.test_queries, len(split.test_queries))):
            if arr.ndim != 2 or arr.shape[0] != n:
                raise BaselineError(f"{name} embeddings have shape {arr.shape}, the split has {n} rows")
            if not np.isfinite(arr).all():
                raise BaselineError(f"{name} embeddings contain NaN or infinite values")


def encode_split(split: ProxySplit, encoder: TextTower, *, cache_dir: str | Path | None = None,
                 encoder_name: str = "") -> SplitEmbeddings:
    """Embed documents, training and test queries (cached as .npz under cache_dir when given)."""
    texts = [split.documents, [q for _, q in split.train_queries], [q for _, q in split.test_queries]]
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256(repr((encoder_name or type(encoder).__name__, texts)).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"split_emb_{key}.npz"
        if cache.is_file():
            z = np.load(cache)
            return SplitEmbeddings(z["documents"], z["train_queries"], z["test_queries"])
    arrays = [np.asarray(encoder.encode(list(t)), dtype=np.float32) for t in texts]
    out = SplitEmbeddings(*arrays)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, documents=out.documents, train_queries=out.train_queries, test_queries=out.test_queries)
    return out


def query_targets(split: ProxySplit) -> list[str]:
    """The correct item id of every test query, in order."""
    return [iid for iid, _ in split.test_queries]


def search_topk(item_vecs: np.ndarray, query_vecs: np.ndarray, k: int, *, backend: str = "torch",
                hnsw_m: int = 32, ef_search: int = 128, device: str = "auto", batch_size: int = 1024
                ) -> np.ndarray:
    """Top-k item rows by inner product for each query -> int64 (Q, k) (-1 pads when k > N)."""
    if backend not in BACKENDS:
        raise BaselineError(f"unknown search backend '{backend}'; known: {', '.join(BACKENDS)}")
    items = np.ascontiguousarray(item_vecs, dtype=np.float32)
    queries = np.ascontiguousarray(query_vecs, dtype=np.float32)
    if items.ndim != 2 or queries.ndim != 2 or items.shape[1] != queries.shape[1]:
        raise BaselineError(f"item vectors {items.shape} and query vectors {queries.shape} do not match")
    if len(items) == 0:
        raise BaselineError("no items to search")
    if k < 1:
        raise BaselineError(f"k must be >= 1, got {k}")
    if backend == "torch":
        dev = resolve_device(device)
        kk = min(k, len(items))
        it = torch.from_numpy(items).to(dev)
        out = []
        for s in range(0, len(queries), batch_size):
            scores = torch.from_numpy(queries[s:s + batch_size]).to(dev) @ it.T  # (b, N)
            out.append(scores.topk(kk, dim=1).indices.cpu().numpy())
        idx = np.concatenate(out) if out else np.zeros((0, kk), np.int64)
        if kk < k:
            idx = np.concatenate([idx, np.full((len(idx), k - kk), -1, np.int64)], axis=1)
        return idx.astype(np.int64)
    import faiss
    if backend == "faiss_flat":
        index = faiss.IndexFlatIP(items.shape[1])
    else:
        index = faiss.IndexHNSWFlat(items.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(ef_search, k)
    index.add(items)
    _, idx = index.search(queries, k)
    return idx.astype(np.int64)


def _rankings(split: ProxySplit, idx: np.ndarray) -> list[list[str]]:
    ids = split.item_ids
    return [[ids[i] for i in row if i >= 0] for row in idx.tolist()]


def dt_zero_shot(split: ProxySplit, emb: SplitEmbeddings, *, k: int = 10, backend: str = "torch") -> list[list[str]]:
    """Test-query embeddings vs document embeddings (cosine)."""
    emb.check(split)
    return _rankings(split, search_topk(unit_rows(emb.documents), unit_rows(emb.test_queries), k, backend=backend))


def doc_plus_queries_vectors(split: ProxySplit, emb: SplitEmbeddings) -> np.ndarray:
    """Item vectors (N, D) = normalised mean of the document and its generated-query embeddings."""
    emb.check(split)
    try:
        return item_plus_query_vectors(emb.documents, split.item_ids, emb.train_queries,
                                       [iid for iid, _ in split.train_queries])
    except ValueError as exc:
        raise BaselineError(str(exc)) from None


def dt_doc_plus_queries(split: ProxySplit, emb: SplitEmbeddings, *, k: int = 10, backend: str = "torch"
                        ) -> list[list[str]]:
    """Test queries vs (document + generated queries) mean vectors."""
    return _rankings(split, search_topk(doc_plus_queries_vectors(split, emb), unit_rows(emb.test_queries), k,
                                        backend=backend))


def train_query_tower(split: ProxySplit, emb: SplitEmbeddings, text_encoder: TextTower, *,
                      config: QueryTowerConfig | None = None, progress: bool = False) -> QueryTower:
    """A query tower trained with InfoNCE on the split's generated queries vs document embeddings."""
    emb.check(split)
    tower = QueryTower(config=config or QueryTowerConfig(), text_encoder=text_encoder,
                       item_dim=emb.documents.shape[1])
    tower.fit(split.train_queries, split.item_ids, unit_rows(emb.documents), text_emb=emb.train_queries,
              progress=progress)
    return tower


def dt_trained(split: ProxySplit, emb: SplitEmbeddings, text_encoder: TextTower, *, k: int = 10,
               backend: str = "torch", config: QueryTowerConfig | None = None, tower: QueryTower | None = None,
               progress: bool = False) -> tuple[list[list[str]], QueryTower]:
    """Trained query tower on the test queries vs document embeddings -> (rankings, tower)."""
    tower = tower or train_query_tower(split, emb, text_encoder, config=config, progress=progress)
    q = tower.project(emb.test_queries)
    return _rankings(split, search_topk(unit_rows(emb.documents), q, k, backend=backend)), tower
