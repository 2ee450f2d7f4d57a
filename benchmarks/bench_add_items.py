"""Adding items to a served run: throughput through the library and the HTTP API, and index bytes per item.

    python benchmarks/bench_add_items.py --run runs/demo --out benchmarks/out/add_items [--items 1000]

Works on a copy of the run (``--out/run``; the original is never written). The run needs RUN/fallback
(the pipeline's `fallback` stage). New items are the run's trained embeddings plus Gaussian noise
of norm ``--noise`` (unit-normalised), with fresh ids; a run's identifier space bounds how many
fit (``max_u`` items per identifier prefix: the demo's 64 allow a few hundred near its 152 items). Measured:

- library: ``Retriever.add_items`` with batches of 1 and of 100 (items/s, wall clock; each batch is
  one committed SQLite transaction, synchronous=FULL);
- API: ``POST /items`` to a ``serve.py`` subprocess on the same copy (JSON bodies with embeddings),
  one client sending requests back to back, batches of 1 and of 100;
- the fallback index's bytes per item: packed hash code + float re-rank vector + id maps (the two
  Python dicts item id <-> faiss id and the faiss IDMap entry), measured as the growth of the
  process's traced Python memory plus the faiss/numpy buffers while adding, and the on-disk size
  of RUN/fallback and store.sqlite per item.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ace.run_folder import RunPaths, copy_trained_run, read_pairs  # noqa: E402


NOISE = 1.0  # --noise: norm of the Gaussian offset from a trained embedding


def new_items(emb: np.ndarray, n: int, prefix: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    base = emb[rng.integers(0, len(emb), n)]
    vec = base + NOISE * rng.standard_normal(base.shape) / np.sqrt(base.shape[1])
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    return [{"item_id": f"{prefix}{i}", "modality": "image", "embedding": v.astype(np.float32).tolist(),
             "captions": [f"benchmark item {i}"]} for i, v in enumerate(vec)]


def bench_library(run: Path, emb: np.ndarray, n: int) -> dict:
    from ace.data.corpus import CorpusItem
    from ace.serving.retriever import Retriever

    r = Retriever.from_run(run, device="cpu")
    out = {}
    for batch in (1, 100):
        rows = new_items(emb, n, f"lib{batch}/", seed=batch)
        items = [CorpusItem(d["item_id"], d["modality"], embedding=np.asarray(d["embedding"], np.float32),
                            captions=d["captions"]) for d in rows]
        t = time.perf_counter()
        for s in range(0, n, batch):
            r.add_items(items[s:s + batch])
        sec = time.perf_counter() - t
        out[f"batch_{batch}"] = {"items": n, "seconds": round(sec, 3), "items_per_s": round(n / sec, 1)}
        print(f"library batch {batch}: {n / sec:.1f} items/s")
    # searching with the fallback holding the added items: merged vs each path alone (100 held-out queries)
    queries = [q for q, _ in read_pairs(RunPaths(run).test_queries)][:100]
    for name, fn in (("generative", r.search_generative), ("fallback", r.search_fallback), ("merged", r.search)):
        fn(queries[:5], k=10)  # warm-up
        t = time.perf_counter()
        fn(queries, k=10)
        out[f"search_ms_per_query_{name}"] = round(1000 * (time.perf_counter() - t) / len(queries), 2)
    out["fallback_items_while_searching"] = len(r.fallback)
    r.close()
    return out


def bench_api(run: Path, emb: np.ndarray, n: int, threads: int) -> dict:
    import httpx

    from load_test import _free_port, _wait_healthy  # benchmarks/load_test.py

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "ACE_API_KEY": "bench"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(run), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", f"torch_threads={threads}"],
                            cwd=ROOT, env=env)
    url, key = f"http://127.0.0.1:{port}", {"X-API-Key": "bench"}
    out = {}
    try:
        _wait_healthy(url, proc, 300)
        with httpx.Client(base_url=url, timeout=120) as c:
            for batch in (1, 100):
                rows = new_items(emb, n, f"api{batch}/", seed=1000 + batch)
                bodies = [json.dumps({"items": rows[s:s + batch]}) for s in range(0, n, batch)]
                lat = []
                t = time.perf_counter()
                for body in bodies:
                    t0 = time.perf_counter()
                    res = c.post("/items", content=body, headers={**key, "content-type": "application/json"})
                    lat.append(time.perf_counter() - t0)
                    if res.status_code != 201:
                        raise RuntimeError(f"POST /items -> {res.status_code}: {res.text[:300]}")
                sec = time.perf_counter() - t
                out[f"batch_{batch}"] = {"items": n, "seconds": round(sec, 3), "items_per_s": round(n / sec, 1),
                                         "request_ms_p50": round(1000 * float(np.median(lat)), 2),
                                         "request_ms_p90": round(1000 * float(np.percentile(lat, 90)), 2)}
                print(f"API batch {batch}: {n / sec:.1f} items/s (p50 {1000 * np.median(lat):.1f} ms per request)")
            out["stats_by_source"] = c.get("/stats").json()["items_by_source"]
    finally:
        proc.kill()
        proc.wait(30)
    return out


def bench_bytes(run: Path, emb: np.ndarray, n: int) -> dict:
    """Bytes per item of the fallback index: in memory (traced Python objects + numpy/faiss buffers) and on disk."""
    from ace.newitems.index import FallbackIndex

    fb = FallbackIndex.load(RunPaths(run).fallback)
    rows = new_items(emb, n, "bytes/", seed=7)
    ids = [d["item_id"] for d in rows]
    vec = np.asarray([d["embedding"] for d in rows], dtype=np.float32)
    codes_bytes = fb.head.bits // 8
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    for s in range(0, n, 1000):
        fb.add(ids[s:s + 1000], vec[s:s + 1000])
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    traced = sum(st.size_diff for st in snap1.compare_to(snap0, "filename"))
    disk = run.parent / "bytes_index"
    if disk.exists():
        shutil.rmtree(disk)
    fb.save(disk)
    empty = run.parent / "bytes_empty"
    if empty.exists():
        shutil.rmtree(empty)
    FallbackIndex.load(RunPaths(run).fallback).save(empty)

    def size(folder: Path) -> dict[str, int]:
        return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}

    full, base = size(disk), size(empty)
    per_file = {k: round((v - base.get(k, 0)) / n, 1) for k, v in full.items() if v != base.get(k, 0)}
    # faiss keeps codes, ids and the HNSW graph outside Python's allocator: its serialised size stands for it
    faiss_bytes = full.get("index/binary.index", 0) - base.get("index/binary.index", 0)
    return {"items": n, "bits": fb.head.bits, "dim": fb.head.dim, "index_kind": fb.index.config.kind,
            "nominal": {"hash_code": codes_bytes, "float_vector": 4 * fb.head.dim, "faiss_id": 8},
            "memory_per_item": round((traced + faiss_bytes) / n, 1),
            "memory_breakdown_per_item": {
                "python_traced (float vectors + codes as numpy rows, id dicts)": round(traced / n, 1),
                "faiss index (codes + ids + HNSW graph, serialised size)": round(faiss_bytes / n, 1)},
            "disk_per_item": round(sum(per_file.values()), 1), "disk_per_file_per_item": per_file}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "add_items")
    ap.add_argument("--items", type=int, default=1000, help="items added per configuration")
    ap.add_argument("--bytes-items", type=int, default=10000, help="items added for the bytes-per-item figure")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", type=float, default=NOISE, help="norm of the offset of new items from trained ones")
    args = ap.parse_args()
    globals()["NOISE"] = args.noise
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if not (RunPaths(args.run).fallback / RunPaths.CALIBRATION).is_file():
        print(f"{args.run} has no RUN/fallback: run `python train.py --config ...` (the fallback stage) first")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    emb = np.load(RunPaths(args.run).embeddings)
    results = {"run": str(args.run), "items": args.items, "threads": args.threads, "noise": args.noise,
               "load_average_before": os.getloadavg()}
    results["library"] = bench_library(copy_trained_run(args.run, args.out / "run_lib"), emb, args.items)
    results["api"] = bench_api(copy_trained_run(args.run, args.out / "run_api"), emb, args.items, args.threads)
    results["bytes_per_item"] = bench_bytes(args.out / "run_lib", emb, args.bytes_items)
    store = [p for p in (args.out / "run_lib").glob(RunPaths.STORE + "*")]
    results["store_bytes_per_item"] = round(sum(p.stat().st_size for p in store) / (2 * args.items), 1)
    results["load_average_after"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
