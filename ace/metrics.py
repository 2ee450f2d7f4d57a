"""Retrieval metrics shared by training-time evaluation, the pipeline report and the benchmarks.

Plain numpy functions in the style of faiss ``contrib/evaluation.py``. A *ranking* is a list of
retrieved item ids per query (best first, any length, may be shorter than k); ``targets`` is the
one relevant item id per query. Figures are fractions in [0, 1]; reports multiply by 100.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def _hit_ranks(rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable]) -> np.ndarray:
    """0-based rank of each query's target in its ranking, or -1 when absent."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} targets")
    ranks = np.full(len(targets), -1, dtype=np.int64)
    for i, (ranking, target) in enumerate(zip(rankings, targets)):
        for r, item in enumerate(ranking):
            if item == target:
                ranks[i] = r
                break
    return ranks


def recall_at_k(rankings, targets, k: int) -> float:
    """Share of queries whose target is among the first k results."""
    if len(targets) == 0:
        raise ValueError("recall_at_k needs at least one query")
    ranks = _hit_ranks(rankings, targets)
    return float(np.mean((ranks >= 0) & (ranks < k)))


def mrr_at_k(rankings, targets, k: int = 10) -> float:
    """Mean reciprocal rank of the target, counting 0 when it is not in the first k."""
    if len(targets) == 0:
        raise ValueError("mrr_at_k needs at least one query")
    ranks = _hit_ranks(rankings, targets)
    hit = (ranks >= 0) & (ranks < k)
    rr = np.zeros(len(ranks))
    rr[hit] = 1.0 / (ranks[hit] + 1.0)
    return float(np.mean(rr))


def retrieval_metrics(rankings, targets, ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10) -> dict[str, float]:
    """{"R@1": .., "R@5": .., "R@10": .., "MRR@10": ..} in percent, plus the query count."""
    out = {f"R@{k}": 100.0 * recall_at_k(rankings, targets, k) for k in ks}
    out[f"MRR@{mrr_k}"] = 100.0 * mrr_at_k(rankings, targets, mrr_k)
    out["queries"] = len(targets)
    return out


def relevance_metrics(rankings: Sequence[Sequence[Hashable]], relevant: Sequence[set], ks: Sequence[int] = (1, 5)) -> dict:
    """Queries with several relevant items (e.g. judged by metadata): {"top1": .., "top5": ..} = percent
    of queries with at least one relevant item among the first k results, plus the query count."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings but {len(relevant)} relevant sets")
    if len(relevant) == 0:
        raise ValueError("relevance_metrics needs at least one query")
    out = {}
    for k in ks:
        out[f"top{k}"] = 100.0 * float(np.mean([any(item in rel for item in ranking[:k])
                                                for ranking, rel in zip(rankings, relevant)]))
    out["queries"] = len(relevant)
    return out


def topk_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row (rows = queries), best first."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (queries x items), got shape {scores.shape}")
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
