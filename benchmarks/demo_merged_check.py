"""Merged (hybrid) search on a trained demo run after a few items are added: the check independent of
the Flickr30K 80/20 run the untrained-level rule was chosen on (quality.md section 11.3).

    OMP_NUM_THREADS=1 python benchmarks/demo_merged_check.py --run runs/demo --work benchmarks/out/demo_merged/work \
        --added 6 --beams 10 50 --rules "best (committed)" "no trained level"

New demonstration items come from ``data/make_demo.py`` with another seed (so they are new colours /
shapes / sounds in combinations the run never saw: items whose attributes equal an old item's are skipped
unless ``--duplicates``), ``--added`` of them spread over the three modalities, ids prefixed ``added_``.
Their last two captions are held out as test queries (as the demo's own split), the rest are the
captions the item is added with. On a fresh copy of the run
(``copy_trained_run``) they are added through ``Retriever.add_items`` (encoded by the run's item
encoders), then, at each beam width:
- old items' held-out captions: the generative path alone vs merged (hybrid) search;
- added items' held-out captions: the fallback path alone vs merged search;
for every added-item rule of ``merged_search_probe.py`` (``use_rule``: this process only).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merged_search_probe import RULES, recall, use_rule  # noqa: E402

from ace.config import load_config  # noqa: E402
from ace.data.corpus import Corpus  # noqa: E402
from ace.pipeline.run_config import CorpusConfig, RunConfig  # noqa: E402
from ace.pipeline.stages import load_source_corpus, split_captions  # noqa: E402
from ace.run_folder import RunPaths, copy_trained_run, load_run_corpus, read_encoder_config, read_pairs  # noqa: E402


def new_items(n: int, seed: int, split, folder: Path, old_metadata: list[dict] | None = None):
    """``n`` new demo items (round-robin over modalities), ids ``added_<id>``: (items, held-out (query, id)).
    With ``old_metadata``, items whose attributes equal an old item's are skipped (a duplicate makes "which
    one is right" undecidable for both items' queries)."""
    full = load_source_corpus(CorpusConfig(demo=True, demo_dir=str(folder), demo_seed=seed))
    by_mod: dict = {}
    for it in full.items:
        if old_metadata is None or it.metadata not in old_metadata:
            by_mod.setdefault(it.modality, []).append(it)
    if sum(map(len, by_mod.values())) < n:
        raise SystemExit(f"only {sum(map(len, by_mod.values()))} new items to add, asked for {n}")
    picked, k = [], 0
    while len(picked) < n:
        mod = sorted(by_mod)[k % len(by_mod)]
        if by_mod[mod]:
            picked.append(by_mod[mod].pop(0))
        k += 1
    items, test = split_captions(Corpus(items=picked, root=full.root, source=full.source), split)
    return items, test


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--work", default="benchmarks/out/demo_merged/work")
    ap.add_argument("--added", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7, help="make_demo seed of the new items (the run's corpus: 0)")
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--duplicates", action="store_true",
                    help="also add new items whose attributes equal an old item's (skipped by default)")
    args = ap.parse_args(argv)

    from ace.data.encoders import build_encoder
    from ace.serving.retriever import Retriever

    run, work = Path(args.run), Path(args.work)
    cfg = load_config(RunConfig, str(RunPaths(run).config), [])
    copy_trained_run(run, work)
    with tempfile.TemporaryDirectory() as tmp:
        old_md = None if args.duplicates else [it.metadata for it in load_run_corpus(run).items]
        items, test = new_items(args.added, args.seed, cfg.split, Path(tmp), old_md)
        emb = build_encoder(read_encoder_config(work)).encode([dataclasses.replace(it, embedding=None)
                                                                for it in items.items], root=items.root)
    added = [dataclasses.replace(it, item_id=f"added_{it.item_id}", embedding=e, media=None)
             for it, e in zip(items.items, emb)]
    new = [(q, f"added_{g}") for q, g in test]
    old = read_pairs(RunPaths(work).test_queries)
    r = Retriever.from_run(work, device="cpu")
    r.add_items(added)
    result: dict = {"run": str(run), "added": [it.item_id for it in added], "duplicates": args.duplicates,
                    "beams": {}}
    for b in args.beams:
        res = {"alone": {"generative, old items": recall(r.search_generative([q for q, _ in old], k=10, num_beams=b), old),
                         "fallback, added items": recall(r.search([q for q, _ in new], k=10, mode="fallback"), new)},
               "merged": {}}
        for rule in args.rules:
            use_rule(r, rule)
            for name, pairs in (("added", new), ("old", old)):
                res["merged"][f"{rule}, {name} items"] = recall(r.search([q for q, _ in pairs], k=10, num_beams=b), pairs)
        result["beams"][b] = res
    r.close()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
