"""DT baselines (zero-shot, document+queries; exact search) on nested subsets of one caption-proxy union.

    PYTHONPATH=. python benchmarks/dt_vs_n.py --sizes 1000 5000 0 --out benchmarks/out/dt_vs_n \
        ../shared/data/flickr30k/flickr30k_val.json ../shared/data/mscoco/mscoco_val.json \
        ../shared/data/flickr8k/Flickr8k.token.txt ../shared/data/clotho/clotho_captions_development.csv

Size 0 = the whole union. MiniLM embeddings of the union are computed once (cached in --out).
"""
import argparse
import json
import os
import time
from pathlib import Path

from ace.bench.baselines import dt_doc_plus_queries, dt_zero_shot, encode_split, query_targets
from ace.bench.corpus_union import nested_subset, subset_embeddings, union_split
from ace.data.encoders import MINILM, TextEncoder
from ace.metrics import retrieval_metrics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    union = union_split(a.files)
    print(f"union: {len(union)} items, {len(union.train_queries)} train / {len(union.test_queries)} test queries", flush=True)
    emb = encode_split(union, TextEncoder(MINILM), cache_dir=out / "cache", encoder_name=MINILM)
    print(f"encoded in {time.time() - t:.0f} s", flush=True)
    rows = []
    for n in a.sizes:
        n = n or len(union)
        sub, se = nested_subset(union, n, a.seed), subset_embeddings(union, emb, n, a.seed)
        targets = query_targets(sub)
        for name, fn in (("dt_zero_shot", dt_zero_shot), ("dt_doc_plus_queries", dt_doc_plus_queries)):
            m = retrieval_metrics(fn(sub, se), targets)
            rows.append({"n": n, "method": name, **m, "test_queries": len(targets)})
            print(f"N={n:,} {name}: R@1 {m['R@1']:.1f} R@10 {m['R@10']:.1f}", flush=True)
    (out / "dt_vs_n.json").write_text(json.dumps({"files": a.files, "seed": a.seed, "items": len(union),
                                                  "load": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
