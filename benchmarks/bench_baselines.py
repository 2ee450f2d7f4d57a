"""Dual-tower baselines and the hashing fallback on a caption file (caption-proxy protocol).

    python benchmarks/bench_baselines.py ../shared/data/flickr30k/flickr30k_val.json
    python benchmarks/bench_baselines.py ../shared/data/mscoco/mscoco_val.json --new-frac 0.2

Prints a Markdown table and writes JSON to benchmarks/out/. Rows:
- DT zero-shot / DT doc+queries / DT trained, each with the torch, faiss flat and faiss HNSW backends;
- fallback (query tower -> hash head -> faiss binary ANN -> float re-rank) over all items, and the
  ratio of its recall to exact DT-trained search on the same items;
- with --new-frac F: the tower and the hash head are trained on the other items only (as at
  training time), the held-out F of the items are added to a FallbackIndex afterwards, and the
  fallback R@10 on their test queries is compared with exact DT-trained search over those items.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ace.bench.baselines import (BACKENDS, dt_doc_plus_queries, dt_trained, dt_zero_shot, encode_split,  # noqa: E402
                           query_targets, search_topk, train_query_tower)
from ace.data.encoders import MINILM, TextEncoder  # noqa: E402
from ace.newitems.index import FallbackIndex  # noqa: E402
from ace.newitems.hashing import BinaryIndexConfig, HashConfig, HashHead  # noqa: E402
from ace.data.importers import ProxySplit, load_proxy_split  # noqa: E402
from ace.metrics import retrieval_metrics  # noqa: E402
from ace.newitems.query_tower import QueryTowerConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def _row(name: str, m: dict, extra: str = "") -> str:
    return f"| {name} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['MRR@10']:.1f} | {extra} |"


def subset(split: ProxySplit, keep: set[str]) -> ProxySplit:
    """The split restricted to the items in ``keep`` (order preserved)."""
    idx = [i for i, iid in enumerate(split.item_ids) if iid in keep]
    return ProxySplit([split.item_ids[i] for i in idx], [split.modalities[i] for i in idx],
                      [split.documents[i] for i in idx],
                      [p for p in split.train_queries if p[0] in keep],
                      [p for p in split.test_queries if p[0] in keep], source=split.source)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("captions", help="caption file (any format of ace.data.importers)")
    ap.add_argument("--format", default=None, help="caption format (default: detected)")
    ap.add_argument("--encoder", default=MINILM)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--bits", type=int, default=128)
    ap.add_argument("--index", default="hnsw", choices=["flat", "hnsw", "ivf"])
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--new-frac", type=float, default=0.0, help="share of items added after training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tower", nargs="*", default=[], help="QueryTowerConfig overrides key=value")
    ap.add_argument("--hash", nargs="*", default=[], help="HashConfig overrides key=value (steps=0: SimHash)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--cache-dir", default=str(OUT / "cache"), help="where split embeddings are cached")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss
        faiss.omp_set_num_threads(args.threads)

    from ace.config import from_dict, parse_overrides
    tower_cfg = from_dict(QueryTowerConfig, {"seed": args.seed, **parse_overrides(args.tower)})
    hash_cfg = from_dict(HashConfig, {"bits": args.bits, "seed": args.seed, **parse_overrides(args.hash)})
    index_cfg = BinaryIndexConfig(kind=args.index, candidates=args.candidates)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    split = load_proxy_split(args.captions, args.format)
    enc = TextEncoder(args.encoder)
    t0 = time.perf_counter()
    emb = encode_split(split, enc, cache_dir=args.cache_dir, encoder_name=args.encoder)
    t_enc = time.perf_counter() - t0
    targets = query_targets(split)
    print(f"{split.source}: {len(split)} items, {len(split.train_queries)} train / {len(targets)} test queries "
          f"(encode {t_enc:.1f}s)", flush=True)

    results: dict = {"captions": args.captions, "items": len(split), "test_queries": len(targets),
                     "encoder": args.encoder, "seed": args.seed, "tower_config": vars(tower_cfg),
                     "hash_config": vars(hash_cfg), "index_config": vars(index_cfg), "rows": {},
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "loadavg_start": os.getloadavg()}}
    lines = ["| method | R@1 | R@5 | R@10 | MRR@10 | note |", "| --- | --- | --- | --- | --- | --- |"]

    def record(name, rankings, note="", tgt=targets):
        m = retrieval_metrics(rankings, tgt)
        results["rows"][name] = {**m, "note": note}
        lines.append(_row(name, m, note))
        print(lines[-1], flush=True)
        return m

    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        record(f"DT zero-shot [{b}]", dt_zero_shot(split, emb, backend=b))
    for b in backends:
        record(f"DT doc+queries [{b}]", dt_doc_plus_queries(split, emb, backend=b))
    t0 = time.perf_counter()
    rank, tower = dt_trained(split, emb, enc, backend=backends[0], config=tower_cfg, progress=True)
    t_tower = time.perf_counter() - t0
    exact = record(f"DT trained [{backends[0]}]", rank, f"tower fit {t_tower:.0f}s, "
                   f"final loss {tower.history[-1]['loss']:.3f}, T={tower.history[-1]['temperature']:.3f}")
    for b in backends[1:]:
        record(f"DT trained [{b}]", dt_trained(split, emb, enc, backend=b, tower=tower)[0])

    # ---- fallback over all items (tower + hash head trained on the full split)
    def build_fallback(tw, ids, docs, fit_docs, fit_queries):
        head = HashHead(dim=docs.shape[1], config=hash_cfg)
        t = time.perf_counter()
        head.fit(fit_docs, extra=tw.project(fit_queries), progress=True)
        t_head = time.perf_counter() - t
        fb = FallbackIndex(tower=tw, head=head, config=index_cfg)
        t = time.perf_counter()
        fb.add(ids, docs)
        return fb, t_head, len(ids) / (time.perf_counter() - t)

    fb, t_head, add_rate = build_fallback(tower, split.item_ids, emb.documents, emb.documents,
                                             emb.train_queries)
    qv = tower.project(emb.test_queries)
    t0 = time.perf_counter()
    res = fb.search_vectors(qv, 10)
    qps = len(qv) / (time.perf_counter() - t0)
    m = record(f"fallback {args.bits}b {args.index}", [[i for i, _ in r] for r in res],
               f"hash fit {t_head:.0f}s, add {add_rate:.0f} items/s, search {qps:.0f} q/s (vectors)")
    results["fallback_vs_exact_R@10"] = m["R@10"] / exact["R@10"]
    results["bytes_per_item"] = fb.bytes_per_item()
    lines.append(f"\nfallback / exact DT-trained R@10 = {results['fallback_vs_exact_R@10']:.3f}; "
                 f"bytes/item: {fb.bytes_per_item()}")

    # ---- items added after training: tower + head see only the old items
    if args.new_frac > 0:
        rng = np.random.default_rng(args.seed)
        n_new = int(round(args.new_frac * len(split)))
        new_rows = np.sort(rng.choice(len(split), n_new, replace=False))
        new_ids = {split.item_ids[i] for i in new_rows}
        old_ids = set(split.item_ids) - new_ids
        old, new = subset(split, old_ids), subset(split, new_ids)
        row = {iid: i for i, iid in enumerate(split.item_ids)}
        sel = lambda s: np.array([row[i] for i in s.item_ids])  # noqa: E731
        tr_rows = lambda s: np.array([j for j, (iid, _) in enumerate(split.train_queries) if iid in set(s.item_ids)])  # noqa: E731
        te_rows = lambda s: np.array([j for j, (iid, _) in enumerate(split.test_queries) if iid in set(s.item_ids)])  # noqa: E731
        from ace.bench.baselines import SplitEmbeddings
        emb_old = SplitEmbeddings(emb.documents[sel(old)], emb.train_queries[tr_rows(old)], emb.test_queries[te_rows(old)])
        tower_old = train_query_tower(old, emb_old, enc, config=tower_cfg, progress=True)
        new_docs = emb.documents[sel(new)]
        fb_new, _, add_rate_new = build_fallback(tower_old, new.item_ids, new_docs, emb_old.documents,
                                                    emb_old.train_queries)
        q_new = tower_old.project(emb.test_queries[te_rows(new)])
        tgt_new = query_targets(new)
        exact_new_tw_old = record(f"new {args.new_frac:.0%}: DT trained (old-item tower), exact",
                                  [[new.item_ids[i] for i in r] for r in search_topk(new_docs, q_new, 10)],
                                  f"{len(new)} new items", tgt_new)
        fb_new_m = record(f"new {args.new_frac:.0%}: fallback (old-item tower + head)",
                          [[i for i, _ in r] for r in fb_new.search_vectors(q_new, 10)],
                          f"add {add_rate_new:.0f} items/s", tgt_new)
        q_new_full = tower.project(emb.test_queries[te_rows(new)])
        exact_new_full = record(f"new {args.new_frac:.0%}: DT trained (tower on all items), exact",
                                [[new.item_ids[i] for i in r] for r in search_topk(new_docs, q_new_full, 10)],
                                "reference: tower saw the new items' queries", tgt_new)
        results["new_items"] = {"n": len(new), "fallback_over_exact_same_tower_R@10":
                                fb_new_m["R@10"] / exact_new_tw_old["R@10"],
                                "fallback_over_exact_full_tower_R@10": fb_new_m["R@10"] / exact_new_full["R@10"]}
        lines.append(f"new items: fallback R@10 / exact (same tower) = "
                     f"{results['new_items']['fallback_over_exact_same_tower_R@10']:.3f}; "
                     f"/ exact (tower trained on all items) = "
                     f"{results['new_items']['fallback_over_exact_full_tower_R@10']:.3f}")

    results["machine"]["loadavg_end"] = os.getloadavg()
    print("\n".join(lines))
    out = Path(args.out) if args.out else OUT / f"baselines_{Path(args.captions).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    results["table"] = "\n".join(lines)
    return results


if __name__ == "__main__":
    main()
