"""Merged search (generative + fallback) on a run trained on 80% of a caption file with the other 20% added (issue 8).

    OMP_NUM_THREADS=1 python benchmarks/bench_merge.py ../shared/data/mscoco/mscoco_val.json \
        --config configs/mscoco_80_20.yaml [--refit]

Copies the trained run (``configs/...`` run_dir, never modified) to ``--work``, adds the other items
through ``Retriever.add_items`` exactly like ``bench_new_items.py``, and reports R@1/R@10 of the old
items' held-out queries (seeded sample) and the new items' held-out queries through the generative
path alone, the fallback alone and merged ``search``. ``--refit`` re-runs the pipeline's ``fallback``
stage (``build_run_fallback``: tower, hash head, calibration) on the copy first, so a changed
calibration/merge is measured on the same generative model without retraining it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ace.config import load_config  # noqa: E402
from ace.metrics import retrieval_metrics  # noqa: E402
from ace.pipeline.run_config import RunConfig  # noqa: E402
from ace.pipeline.stages import load_source_corpus, split_captions  # noqa: E402
from ace.run_folder import RunPaths, copy_trained_run, read_pairs  # noqa: E402


def _recall(hits, pairs) -> dict:
    m = retrieval_metrics([[h.item_id for h in row] for row in hits], [t for _, t in pairs])
    return {"R@1": m["R@1"], "R@10": m["R@10"], "queries": len(pairs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("captions")
    ap.add_argument("--config", default="configs/mscoco_80_20.yaml")
    ap.add_argument("--work", default="benchmarks/out/merge/work")
    ap.add_argument("--out", default="benchmarks/out/merge/results.json")
    ap.add_argument("--old-queries", type=int, default=2000)
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refit", action="store_true", help="re-run the fallback stage (tower + calibration) on the copy")
    ap.add_argument("--reuse", action="store_true", help="keep an existing --work copy with its adds (not with --refit)")
    ap.add_argument("--dump", default=None, help="pickle the raw per-query results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cfg = load_config(RunConfig, ROOT / args.config, [f"corpus.path={args.captions}"])
    run, work = ROOT / cfg.run_dir, ROOT / args.work
    result: dict = {"command": " ".join(sys.argv), "load_avg_start": os.getloadavg()}
    from ace.data.encoders import build_encoder
    from ace.pipeline.fallback_stage import build_run_fallback
    from ace.run_folder import read_encoder_config
    from ace.serving.retriever import Retriever

    full = load_source_corpus(dataclasses.replace(cfg.corpus, path=args.captions, limit=None))
    new_items, new_test = split_captions(type(full)(items=full.items[cfg.corpus.limit:], root=full.root,
                                                    source=full.source), cfg.split)
    fresh = args.refit or not (args.reuse and RunPaths(work).store.is_file())  # the stage refits before any add
    if fresh:
        copy_trained_run(run, work)
    if args.refit:
        t = time.time()
        summary = build_run_fallback(work, cfg.fallback, seed=cfg.seed, device="cpu")
        result["fallback_stage"] = {"seconds": time.time() - t, "calibration": summary["calibration"]}
    r = Retriever.from_run(work, device="cpu")
    if fresh:
        encoder = build_encoder(read_encoder_config(work))
        items = [dataclasses.replace(it, embedding=None) for it in new_items.items]
        for s in range(0, len(items), 100):
            batch = items[s:s + 100]
            r.add_items([dataclasses.replace(it, embedding=e, media=None) for it, e in zip(batch, encoder.encode(batch))])
    old = read_pairs(RunPaths(work).test_queries)
    rng = np.random.default_rng(args.seed)
    old = [old[i] for i in sorted(rng.permutation(len(old))[:args.old_queries])]
    t = time.time()
    raw = {}
    for name, pairs in (("old", old), ("new", new_test)):
        queries = [q for q, _ in pairs]
        raw[name] = {"pairs": pairs, "generative": r.search_generative(queries, k=10, num_beams=args.beams),
                     "fallback": r.search_fallback(queries, k=10),
                     "merged": r.search(queries, k=10, num_beams=args.beams)}
        for source in ("generative", "fallback", "merged"):
            result[f"{name}_{source}"] = _recall(raw[name][source], pairs)
    result["search_seconds"] = time.time() - t
    result["fallback_items"] = len(r.fallback)
    r.close()
    result["load_avg_end"] = os.getloadavg()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    if args.dump:
        with open(ROOT / args.dump, "wb") as fh:
            pickle.dump(raw, fh)
    print("| R@1 / R@10 | generative alone | fallback alone | merged search |\n| --- | --- | --- | --- |")
    for name in ("old", "new"):
        print(f"| {name} items | " + " | ".join(f"{result[f'{name}_{s}']['R@1']:.1f} / {result[f'{name}_{s}']['R@10']:.1f}"
                                             for s in ("generative", "fallback", "merged")) + " |")
    return result


if __name__ == "__main__":
    main()
