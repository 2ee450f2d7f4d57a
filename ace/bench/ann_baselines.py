"""Approximate-search comparators of the efficiency benchmark, tuned to a recall target.

A dual tower (DT) is served with an approximate index in practice, and a user tunes it until it
finds (almost) what exact search finds. This module builds and tunes the faiss indexes the
benchmark compares ACE with:

- ``faiss_hnsw``: ``IndexHNSWFlat`` (inner product). Builds are tried in the order of
  ``hnsw_builds`` ((M, efConstruction) pairs, each cached); for each build efSearch runs up the
  grid ``EF_SEARCH_GRID`` until recall@10 vs exact reaches the target; the first build that reaches
  it is kept (else the build and efSearch with the highest recall, marked as missed).
- ``faiss_ivfpq``: ``IndexIVFPQ`` with nlist = factor x sqrt(N) lists and ``pq_bytes`` sub-quantisers
  of 8 bits (the hybrid mode's PQ budget: 48 bytes per item); nprobe tuned up ``1, 2, 4, ..., nlist``.
- ``faiss_ivfsq8``: ``IndexIVFScalarQuantizer`` 8-bit (the hybrid mode's int8 budget: D bytes per
  item + the faiss id), nprobe tuned likewise.

Recall is measured on query *vectors*: ``tune`` queries (near-item queries of another seed than the
reported ones, so the chosen setting is not fitted on the figure it reports) against the exact
top-10 of ``IndexFlatIP`` over the same vectors. ``ann_recall`` is the index-vs-exact overlap, not
``ace.metrics.recall_at_k`` (a query's one target item in its top k).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ace.arrays import unit_rows

TOP_K = 10
ANN_BACKENDS = ("faiss_hnsw", "faiss_ivfpq", "faiss_ivfsq8")
EF_SEARCH_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PLATEAU = 0.01                       # target missed: the smallest setting within this of the best recall
CHUNK = 100_000                      # rows per add() / exact-search chunk (bounded memmap reads)


class AnnError(ValueError):
    """Bad ANN settings or inputs; the message names the problem."""


# ------------------------------------------------------------------------------ recall and size helpers

def near_item_sample(vectors: np.ndarray, count: int, *, noise: float = 0.5, seed: int = 0):
    """(rows, queries): ``count`` distinct random items and unit queries normalise(x_i + e), |e| ~ noise."""
    if count < 1:
        raise AnnError(f"need at least one query, got {count}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(vectors.shape[0], size=min(count, vectors.shape[0]), replace=False))
    x = np.asarray(vectors[rows], dtype=np.float32)                                    # (Q, D)
    x = x + noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(x.shape[1])
    return rows, np.ascontiguousarray(unit_rows(x), dtype=np.float32)


def near_item_queries(vectors: np.ndarray, count: int, *, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` unit queries near random items: normalise(x_i + e), |e| ~ noise (in-distribution
    queries, as a trained DT's queries land near their items)."""
    return near_item_sample(vectors, count, noise=noise, seed=seed)[1]


def ann_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Recall of an approximate index against exact search: the mean share of each exact top-k row
    found in the approximate top-k (row-wise). Not ``ace.metrics.recall_at_k``, the share of queries
    whose one target item is in their top k."""
    approx, exact = np.asarray(approx), np.asarray(exact)
    if approx.shape != exact.shape or approx.ndim != 2:
        raise AnnError(f"approximate {approx.shape} and exact {exact.shape} results must be equal 2-D shapes")
    hits = [len(set(a.tolist()) & set(e[e >= 0].tolist())) / max(int((e >= 0).sum()), 1)
            for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def own_item_rate(found: np.ndarray, rows: np.ndarray) -> float:
    """Share of near-item queries whose source item is among the returned rows."""
    return float(np.mean([int(r) in set(f.tolist()) for f, r in zip(np.asarray(found), rows)]))


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Exact inner-product top-k rows (Q, k) over ``vectors`` (IndexFlatIP, chunked over the rows)."""
    import faiss
    n, d = vectors.shape
    best_s = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((queries.shape[0], 0), np.int64)
    for s in range(0, n, CHUNK):
        flat = faiss.IndexFlatIP(d)
        flat.add(np.ascontiguousarray(vectors[s:s + CHUNK], dtype=np.float32))
        sc, ix = flat.search(queries, min(k, flat.ntotal))
        best_s = np.concatenate([best_s, sc], 1)
        best_i = np.concatenate([best_i, ix + s], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def faiss_index_bytes(index) -> int:
    """Bytes of a faiss index: IndexFlat / IndexHNSWFlat from faiss's own vectors (the serialised
    size minus a header of a few hundred bytes); IVF indexes: their serialised size (codes, ids,
    coarse centroids, quantiser tables)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        hnsw = index.hnsw
        links = (hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
                 + hnsw.assign_probas.size() * 8 + hnsw.cum_nneighbor_per_level.size() * 4)
        return int(faiss_index_bytes(index.storage) + links)
    if isinstance(index, faiss.IndexFlatCodes):
        return int(index.codes.size())
    if isinstance(index, faiss.IndexIVF) and index.is_trained:
        return int(len(faiss.serialize_index(index)))
    raise AnnError(f"no size accounting for faiss index type {type(index).__name__}")


# ------------------------------------------------------------------------------ settings

def parse_hnsw_builds(specs: list[str]) -> list[tuple[int, int]]:
    """``["32:40", "32:100"]`` -> [(M, efConstruction), ...], each >= 2 / >= 1."""
    out = []
    for spec in specs:
        m, sep, efc = str(spec).partition(":")
        try:
            pair = (int(m), int(efc))
        except ValueError:
            raise AnnError(f"HNSW build {spec!r} must be M:efConstruction, e.g. 32:40") from None
        if not sep or pair[0] < 2 or pair[1] < 1:
            raise AnnError(f"HNSW build {spec!r} must be M:efConstruction with M >= 2 and efConstruction >= 1")
        out.append(pair)
    if not out:
        raise AnnError("at least one HNSW build (M:efConstruction) is needed")
    return out


def ivf_shape(n: int, dim: int, *, nlist_factor: float, pq_bytes: int) -> dict:
    """nlist = round(factor x sqrt(N)) (at most N / 4, at least 1); PQ sub-quantisers = the largest
    divisor of ``dim`` <= pq_bytes, 8 bits each (fewer bits when N is too small to train 256 centroids)."""
    if nlist_factor <= 0 or pq_bytes < 1:
        raise AnnError(f"ivf nlist factor and pq bytes must be positive, got {nlist_factor} and {pq_bytes}")
    nlist = max(1, min(int(round(nlist_factor * math.sqrt(n))), n // 4))
    m = max(d for d in range(1, min(pq_bytes, dim) + 1) if dim % d == 0)
    nbits = max(1, min(8, int(math.log2(max(n, 2) // 2))))
    return {"nlist": nlist, "pq_m": m, "pq_nbits": nbits}


# ------------------------------------------------------------------------------ builds (cached)

def vectors_tag(vectors: np.ndarray) -> str:
    """8 hex digits of the first and last rows: two corpora of the same shape (e.g. the first 100k rows
    of a 1M sample and a 100k sample) never share a cached index."""
    import hashlib
    edge = np.concatenate([np.asarray(vectors[:8], np.float32), np.asarray(vectors[-8:], np.float32)])
    return hashlib.sha1(edge.tobytes()).hexdigest()[:8]


def _cached(cache_dir: str | None, name: str):
    import faiss
    if not cache_dir:
        return None, None
    path = Path(cache_dir) / name
    if path.is_file() and path.with_suffix(".json").is_file():
        return path, (faiss.read_index(str(path)), json.loads(path.with_suffix(".json").read_text())["build_s"])
    return path, None


def _save(path: Path | None, index, build_s: float, threads: int) -> None:
    import faiss
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(path))
        path.with_suffix(".json").write_text(json.dumps({"build_s": build_s, "threads": threads,
                                                         "load_after": os.getloadavg()}))


def build_hnsw(vectors: np.ndarray, *, m: int, ef_construction: int, seed: int, cache_dir: str | None,
               threads: int, search_threads: int):
    """IndexHNSWFlat (inner product) over vectors and its build seconds; cached in cache_dir."""
    import faiss
    n, d = vectors.shape
    path, hit = _cached(cache_dir, f"hnsw_{n}x{d}_{vectors_tag(vectors)}_s{seed}_M{m}_efc{ef_construction}.faiss")
    if hit:
        return hit
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    return _build(index, vectors, path, threads=threads, search_threads=search_threads)


def _build(index, vectors: np.ndarray, path, *, threads: int, search_threads: int, train_rows=None):
    """Train (on ``train_rows``, if given) and fill ``index`` in chunks with ``threads``; save it; (index, build s)."""
    import faiss
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    if train_rows is not None:
        index.train(np.ascontiguousarray(vectors[train_rows], dtype=np.float32))
    for s in range(0, len(vectors), CHUNK):
        index.add(np.ascontiguousarray(vectors[s:s + CHUNK], dtype=np.float32))
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(search_threads)
    _save(path, index, build_s, threads)
    return index, build_s


def build_ivf(vectors: np.ndarray, kind: str, *, nlist_factor: float, pq_bytes: int, seed: int,
              cache_dir: str | None, threads: int, search_threads: int):
    """IVF-PQ (``kind="pq"``) or IVF-SQ8 (``"sq8"``) over vectors, trained on <= 40 x nlist rows; cached."""
    import faiss
    n, d = vectors.shape
    shape = ivf_shape(n, d, nlist_factor=nlist_factor, pq_bytes=pq_bytes)
    nlist = shape["nlist"]
    tag = f"pq{shape['pq_m']}x{shape['pq_nbits']}" if kind == "pq" else "sq8"
    path, hit = _cached(cache_dir, f"ivf_{n}x{d}_{vectors_tag(vectors)}_s{seed}_nl{nlist}_{tag}.faiss")
    if hit:
        return hit
    quantizer = faiss.IndexFlatIP(d)
    if kind == "pq":
        index = faiss.IndexIVFPQ(quantizer, d, nlist, shape["pq_m"], shape["pq_nbits"], faiss.METRIC_INNER_PRODUCT)
    elif kind == "sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        raise AnnError(f"unknown IVF kind {kind!r} (pq or sq8)")
    index.cp.niter = 10
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))
    return _build(index, vectors, path, threads=threads, search_threads=search_threads, train_rows=sample)


# ------------------------------------------------------------------------------ tuning

def set_param(index, backend: str, value: int) -> None:
    """efSearch (HNSW) or nprobe (IVF) on a built index."""
    import faiss
    if backend == "faiss_hnsw":
        faiss.downcast_index(index).hnsw.efSearch = max(int(value), TOP_K)
    else:
        faiss.extract_index_ivf(index).nprobe = int(value)


def tune_search(index, backend: str, grid, queries: np.ndarray, exact: np.ndarray, target: float) -> dict:
    """Walk ``grid`` (increasing efSearch / nprobe) until recall@10 vs ``exact`` >= target.

    Returns {"param", "value", "recall", "met", "tried": [{value, recall, ms_per_query}]}; when the
    target is never met (e.g. PQ codes too coarse to order near-tied items), the smallest value within
    ``PLATEAU`` of the highest recall seen: more probes would cost time and gain (almost) nothing."""
    tried = []
    name = "efSearch" if backend == "faiss_hnsw" else "nprobe"
    for v in grid:
        set_param(index, backend, v)
        t = time.perf_counter()
        found = index.search(queries, TOP_K)[1]
        ms = 1000 * (time.perf_counter() - t) / len(queries)
        tried.append({"value": int(v), "recall": ann_recall(found, exact), "ms_per_query": ms})
        if tried[-1]["recall"] >= target:
            break
    top = max(t["recall"] for t in tried)
    best = next((t for t in tried if t["recall"] >= target), None) or \
        next(t for t in tried if t["recall"] >= top - PLATEAU)
    set_param(index, backend, best["value"])
    return {"param": name, "value": best["value"], "recall": best["recall"], "met": best["recall"] >= target,
            "tried": tried}


def tuned_index(backend: str, vectors: np.ndarray, tune_queries: np.ndarray, tune_exact: np.ndarray, *,
                target: float, hnsw_builds: list[tuple[int, int]], nlist_factor: float, pq_bytes: int,
                seed: int, cache_dir: str | None, threads: int, search_threads: int):
    """(index set to its tuned parameter, info) for one ANN backend over ``vectors``.

    info: build_s, tune_s, params (M / efConstruction / efSearch or nlist / PQ / nprobe), tune recall,
    met, and every build / value tried."""
    if not 0 < target <= 1:
        raise AnnError(f"the recall target must be in (0, 1], got {target}")
    t0 = time.perf_counter()
    kw = dict(seed=seed, cache_dir=cache_dir, threads=threads, search_threads=search_threads)
    if backend == "faiss_hnsw":
        attempts = []
        for m, efc in hnsw_builds:
            index, build_s = build_hnsw(vectors, m=m, ef_construction=efc, **kw)
            res = tune_search(index, backend, EF_SEARCH_GRID, tune_queries, tune_exact, target)
            attempts.append({"M": m, "efConstruction": efc, "build_s": build_s, **res})
            if res["met"]:
                break
            if len(attempts) < len(hnsw_builds):
                del index
        best = next((a for a in attempts if a["met"]), None) or max(attempts, key=lambda a: a["recall"])
        if best is not attempts[-1]:
            index, _ = build_hnsw(vectors, m=best["M"], ef_construction=best["efConstruction"], **kw)
            set_param(index, backend, best["value"])
        params = {"M": best["M"], "efConstruction": best["efConstruction"], "efSearch": best["value"]}
        build_s, tried = best["build_s"], attempts
    elif backend in ("faiss_ivfpq", "faiss_ivfsq8"):
        kind = "pq" if backend == "faiss_ivfpq" else "sq8"
        index, build_s = build_ivf(vectors, kind, nlist_factor=nlist_factor, pq_bytes=pq_bytes, **kw)
        ivf = __import__("faiss").extract_index_ivf(index)
        grid = sorted({min(2 ** i, ivf.nlist) for i in range(int(math.log2(ivf.nlist)) + 2)})
        best = tune_search(index, backend, grid, tune_queries, tune_exact, target)
        params = {"nlist": int(ivf.nlist), "nprobe": best["value"]}
        if kind == "pq":
            pq = __import__("faiss").downcast_index(index).pq
            params.update({"pq_m": int(pq.M), "pq_nbits": int(pq.nbits)})
        tried = best["tried"]
    else:
        raise AnnError(f"unknown ANN backend {backend!r}; known: {', '.join(ANN_BACKENDS)}")
    info = {"backend": backend, "params": params, "build_s": build_s, "target": target,
            "tune_recall": best["recall"], "met": best["met"], "tune_queries": int(tune_queries.shape[0]),
            "tune_s": time.perf_counter() - t0, "tried": tried}
    return index, info


def params_text(params: dict | None) -> str:
    return "" if not params else ", ".join(f"{k} {v}" for k, v in params.items())


def ann_markdown(rows: list[dict]) -> list[str]:
    """The table of tuned ANN settings and recalls (one line per ANN row)."""
    ann = [r for r in rows if r.get("ann")]
    if not ann:
        return []
    lines = ["", "Approximate DT indexes, tuned on held-out near-item query vectors to recall@10 >= "
             f"{ann[0]['ann']['target']:.2f} of exact (IndexFlatIP); reported recall on other queries:", "",
             "| device | N | D | method | chosen settings | tune recall@10 | target met | recall@10 near-item / "
             "text queries | own item in top-10 (ANN / exact) | build s | tune s | index B/item |",
             "|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in ann:
        a = r["ann"]
        own = r.get("own_item_top10") or {}
        lines.append(f"| {r['device']} | {r['n']:,} | {r['dim']} | {r['method']} | {params_text(a['params'])} | "
                     f"{a['tune_recall']:.3f} | {'yes' if a['met'] else '**no**'} | "
                     f"{_f(r.get('recall_at_10_near_items'))} / {_f(r.get('recall_at_10_vs_exact'))} | "
                     f"{_f(own.get('ann'))} / {_f(own.get('exact'))} | {a['build_s']:.0f} | {a['tune_s']:.0f} | "
                     f"{r['data_per_item']:,.0f} |")
    return lines


def _f(x) -> str:
    return "" if x is None else f"{x:.3f}"
