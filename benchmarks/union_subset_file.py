"""Write nested subsets of one caption-proxy union as caption files the quality bench reads (issue 14, quality vs N).

    PYTHONPATH=. python benchmarks/union_subset_file.py --sizes 1000 5000 --out benchmarks/out/union \
        ../shared/data/flickr30k/flickr30k_val.json ../shared/data/mscoco/mscoco_val.json \
        ../shared/data/flickr8k/Flickr8k.token.txt ../shared/data/clotho/clotho_captions_development.csv
    python -m ace.bench quality --captions benchmarks/out/union/union_1000.json --format karpathy ...

The union and its nested subsets are ``ace.bench.corpus_union`` (the same ones ``benchmarks/dt_vs_n.py``
measures DT on). Each subset is written as a Karpathy-style JSON list, one entry per item with its five
captions in protocol order (document, the two training captions, the two test captions), so the quality
bench's own caption-proxy split of that file is exactly the subset's split: every method (DT and ACE)
sees the same items, training queries and test queries as ``dt_vs_n.py``. Item ids keep their
``<file stem>:`` prefix. The files hold caption text from ../shared/data: they stay in benchmarks/out
(never committed). Size 0 = the whole union.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ace.bench.corpus_union import nested_subset, union_split
from ace.data.importers import ProxySplit


def subset_entries(split: ProxySplit) -> list[dict]:
    """One {"image_name", "captions"} entry per item: document, training captions, test captions."""
    train: dict[str, list[str]] = {}
    test: dict[str, list[str]] = {}
    for iid, q in split.train_queries:
        train.setdefault(iid, []).append(q)
    for iid, q in split.test_queries:
        test.setdefault(iid, []).append(q)
    out = []
    for iid, doc in zip(split.item_ids, split.documents):
        caps = [doc] + train.get(iid, []) + test.get(iid, [])
        if len(caps) != 5:
            raise ValueError(f"item {iid!r} has {len(caps)} protocol captions, expected 5")
        out.append({"image_name": iid, "captions": caps})
    return out


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0, help="the nested subsets' permutation seed (dt_vs_n.py's --seed)")
    a = ap.parse_args(argv)
    union = union_split(a.files)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n in a.sizes:
        sub = union if n == 0 else nested_subset(union, n, a.seed)
        path = out / f"union_{n or len(union)}.json"
        path.write_text(json.dumps(subset_entries(sub)))
        print(f"{path}: {len(sub)} items, {len(sub.test_queries)} test queries")
        written.append(path)
    return written


if __name__ == "__main__":
    main()
