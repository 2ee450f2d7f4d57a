"""What recall@10 against exact search means on the efficiency benchmark's synthetic items.

    python benchmarks/synthetic_ties.py --cache-dir benchmarks/out/cache14 --sizes 1000 10000 100000 1000000 \
        [--queries ../shared/data/flickr30k/flickr30k_val.json]

For near-item queries (``near_item_sample``, the reported seed) and, with --queries, MiniLM caption
queries: the exact inner-product scores at ranks 1, 2, 10 and 11 (means), the median gap between
rank 10 and rank 11 (how close to a tie the 10th place is), and the share of queries whose own
item is rank 1. Prints a Markdown table.
"""
import argparse

import faiss
import numpy as np

from ace.bench.ann_baselines import near_item_sample
from ace.bench.efficiency import item_vectors, load_queries


def top_scores(x: np.ndarray, q: np.ndarray, k: int = 11):
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, x.shape[0], 100_000):
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(np.ascontiguousarray(x[s:s + 100_000], dtype=np.float32))
        sc, ix = flat.search(q, min(k, flat.ntotal))
        best_s, best_i = np.concatenate([best_s, sc], 1), np.concatenate([best_i, ix + s], 1)
        keep = np.argsort(-best_s, 1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_s, best_i


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", default=None)
    ap.add_argument("--count", type=int, default=200)
    a = ap.parse_args()
    faiss.omp_set_num_threads(1)
    x_all = item_vectors(max(a.sizes), a.dim, seed=0, cache_dir=a.cache_dir)
    text_q = None
    if a.queries:
        from ace.data.encoders import TextEncoder
        text_q = TextEncoder("all-MiniLM-L6-v2").encode(load_queries(a.queries, need=a.count)[:a.count])
    print("| N | queries | score rank 1 | rank 2 | rank 10 | rank 11 | median gap rank 10 - 11 | own item rank 1 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in a.sizes:
        x = x_all[:n]
        rows, q = near_item_sample(x, a.count, seed=0)
        sets = [("near-item", q, rows)] + ([("caption text", np.ascontiguousarray(text_q, np.float32), None)]
                                           if text_q is not None else [])
        for name, qq, rr in sets:
            s, i = top_scores(x, qq)
            own = "" if rr is None else f"{np.mean(i[:, 0] == rr):.3f}"
            print(f"| {n:,} | {name} | {s[:, 0].mean():.3f} | {s[:, 1].mean():.3f} | {s[:, 9].mean():.3f} | "
                  f"{s[:, 10].mean():.3f} | {np.median(s[:, 9] - s[:, 10]):.4f} | {own} |", flush=True)


if __name__ == "__main__":
    main()
