"""One caption-proxy corpus made of several caption files, and nested subsets of it (quality vs N).

``union_split(paths)`` applies the caption-proxy protocol to every file (items with >= 5 captions)
and concatenates the splits; item ids become ``<file stem>:<id>`` so two files never clash.
``nested_subset(split, n, seed)`` keeps the first n items of one seeded permutation, so the subsets
of sizes n1 < n2 < ... are nested (every item of the 1k corpus is in the 5k corpus), with their
training and test queries; ``subset_embeddings`` cuts a ``SplitEmbeddings`` of the union the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ace.data.importers import ProxySplit, caption_proxy_split, read_captions


class UnionError(ValueError):
    """Bad union input (no files, a size larger than the union); the message names it."""


def union_split(paths: list[str | Path], *, min_captions: int = 5) -> ProxySplit:
    if not paths:
        raise UnionError("no caption files given")
    out = ProxySplit([], [], [], [], [], source=" + ".join(str(p) for p in paths))
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) < len(stems):
        raise UnionError(f"two caption files share a name stem: {stems}")
    for path, stem in zip(paths, stems):
        s = caption_proxy_split(read_captions(path), source=str(path), min_captions=min_captions)
        pre = f"{stem}:"
        out.item_ids += [pre + i for i in s.item_ids]
        out.modalities += s.modalities
        out.documents += s.documents
        out.media += s.media or [None] * len(s.item_ids)
        out.train_queries += [(pre + i, q) for i, q in s.train_queries]
        out.test_queries += [(pre + i, q) for i, q in s.test_queries]
    return out


def subset_rows(split: ProxySplit, n: int, seed: int = 0) -> np.ndarray:
    """Sorted item rows of the nested subset of size n (the first n of one seeded permutation)."""
    if not 1 <= n <= len(split):
        raise UnionError(f"subset size {n} must be in [1, {len(split)}] (the union's items)")
    return np.sort(np.random.default_rng(seed).permutation(len(split))[:n])


def nested_subset(split: ProxySplit, n: int, seed: int = 0) -> ProxySplit:
    rows = subset_rows(split, n, seed)
    keep = {split.item_ids[i] for i in rows}
    return ProxySplit([split.item_ids[i] for i in rows], [split.modalities[i] for i in rows],
                      [split.documents[i] for i in rows], [p for p in split.train_queries if p[0] in keep],
                      [p for p in split.test_queries if p[0] in keep], source=f"{split.source} [{n} of {len(split)}]",
                      media=[split.media[i] for i in rows] if split.media else [])


def subset_embeddings(split: ProxySplit, emb, n: int, seed: int = 0):
    """The union's SplitEmbeddings cut to ``nested_subset(split, n, seed)``."""
    from ace.bench.baselines import SplitEmbeddings
    rows = subset_rows(split, n, seed)
    keep = {split.item_ids[i] for i in rows}
    tr = [j for j, (i, _) in enumerate(split.train_queries) if i in keep]
    te = [j for j, (i, _) in enumerate(split.test_queries) if i in keep]
    return SplitEmbeddings(emb.documents[rows], emb.train_queries[tr], emb.test_queries[te])
