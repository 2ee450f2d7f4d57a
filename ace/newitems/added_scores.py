"""How an item added after training (never a decoding target) gets a log-prob on the generative scale,
so that merged search ranks it with the trained candidates by one score (``hybrid.search_merged``).

``hybrid.added_levels`` picks the rule:

- ``trained``: its identifier teacher-forced up to its trained depth, the rest at the best per-level
  log-prob of the query's candidates (``untrained_completion``);
- ``none``: the best candidate's log-prob (the cosine alone decides; ``neighbour_completion`` with
  ``hybrid.added_neighbour`` > 0 discounts it by how unlike the candidates the item is);
- ``signature``: the log-prob of the candidate the model maps the item's own texts to
  (``item_signatures``, ``signature_completion``).
"""
from __future__ import annotations

import numpy as np

from ace.newitems.candidates import generative_candidates
from ace.newitems.item_vectors import ItemVectorSet


def untrained_completion(level_logprob: np.ndarray, depth: np.ndarray, generative_logprob: np.ndarray,
                         generative_rows: np.ndarray) -> np.ndarray:
    """Log-prob of added items' identifiers on the generative scale.

    ``level_logprob`` (Q, F, levels): teacher-forced log P of each level of F added items' identifiers;
    ``depth`` (Q, F): their trained depth (``trained_depth``). A level past that depth was never a
    training target in that context, so its log-prob is no evidence against the item (an added item
    scored -18 on average against -2 for a trained gold item on Flickr30K 80/20, and merged search lost
    it: BENCHMARKS.md, new items). Such a level gets the benefit of the doubt: the best per-level
    log-prob of the query's generative candidates (``generative_logprob`` (Q, B) summed over
    ``levels``, rows < 0 pads; 0 with none), so the cosine decides between an added item and the
    best trained one. Returns (Q, F)."""
    levels = level_logprob.shape[-1]
    valid = np.asarray(generative_rows) >= 0
    best = np.where(valid, generative_logprob, -np.inf).max(1, initial=-np.inf)
    per_level = np.where(np.isfinite(best), best, 0.0) / levels                             # (Q,)
    known = np.arange(levels) < np.asarray(depth)[..., None]                                  # (Q, F, levels)
    return np.where(known, level_logprob, per_level[:, None, None]).sum(-1)


def candidate_vectors(stored: np.ndarray, cand_ids: list[list[str | None]], vectors: ItemVectorSet,
                      extra_vectors: dict) -> np.ndarray:
    """(Q, C, d) unit vectors of the candidates: ``stored`` (Q, C) their rows in ``vectors``; a -1 row is
    a pad (id None: zeros) or an item trained in later (its ``extra_vectors`` entry)."""
    out = np.where((stored >= 0)[..., None], vectors.decode(np.maximum(stored, 0)), 0.0).astype(np.float32)
    for i, j in zip(*np.nonzero(stored < 0)):
        if cand_ids[i][j] is not None:
            out[i, j] = extra_vectors[cand_ids[i][j]]
    return out


def neighbour_completion(generative_logprob: np.ndarray, generative_rows: np.ndarray, similarity: np.ndarray,
                         penalty: float) -> np.ndarray:
    """Log-prob of added items (no level trained) on the generative scale, from their neighbours.

    ``generative_logprob`` (Q, B): the query's candidates' log-probs (rows < 0 in ``generative_rows``:
    pads); ``similarity`` (Q, F, B): cosine between each of F added items' vectors and each candidate's.
    An added item takes max over candidates c of ``log P(c) - penalty * (1 - sim(item, c))``: it is
    treated as the trained candidate it most resembles, discounted by how unlike it it is (``penalty``
    in nats per unit of cosine: ``hybrid.added_neighbour * w``). ``penalty`` 0 gives every added item
    the best candidate's log-prob (the cosine alone decides: BENCHMARKS.md, quality 12.2), which lets
    an added item unlike every candidate outrank them on an old item's query. With no candidate: 0.
    Returns (Q, F)."""
    valid = (np.asarray(generative_rows) >= 0)[:, None, :]                                  # (Q, 1, B)
    cand = np.where(valid, np.asarray(generative_logprob)[:, None, :] - penalty * (1.0 - similarity), -np.inf)
    best = cand.max(-1, initial=-np.inf)                                                    # (Q, F)
    return np.where(np.isfinite(best), best, 0.0)


def item_signatures(model, query_tokenizer, trie, table_ids: list[str], vocab, texts_of_items: list[list[str]],
                    num_beams: int, levels: str) -> list[dict[str, float]]:
    """The model's view of each item from its own texts: per item, trained item id -> the mean over its
    texts of that item's share of the text's generative top-``num_beams`` (softmax of their log-probs)."""
    flat = [t for texts in texts_of_items for t in texts]
    if not flat:
        return [{} for _ in texts_of_items]
    rows, lp, _ = generative_candidates(model, query_tokenizer, trie, vocab, flat, num_beams, levels=levels)
    lp = np.where(rows >= 0, lp, -np.inf)
    share = np.exp(lp - lp.max(1, keepdims=True))
    share /= share.sum(1, keepdims=True)
    out, s = [], 0
    for texts in texts_of_items:
        sig: dict[str, float] = {}
        for r_row, p_row in zip(rows[s:s + len(texts)], share[s:s + len(texts)]):
            for r, p in zip(r_row.tolist(), p_row.tolist()):
                if r >= 0:
                    sig[table_ids[r]] = sig.get(table_ids[r], 0.0) + p / len(texts)
        out.append(sig)
        s += len(texts)
    return out


def signature_completion(generative_logprob: np.ndarray, cand_ids: list[list[str | None]],
                         signatures: list[dict[str, float]], top: np.ndarray) -> np.ndarray:
    """Log-prob of added items on the generative scale from their signatures (``item_signatures``).

    An added item a scores ``max_c log P(c | q) + log(share_a(c) / max share_a)`` over the query's
    candidates c: the log-prob of the trained item the model maps a's own texts to most (its "home"),
    less the log of how much less it maps them to another candidate. A query whose top candidate is a's
    home: that candidate's log-prob (the cosine decides between them). Its texts reach none of the
    query's candidates: the weakest candidate's log-prob (a floor: it can still pass weak candidates on
    the cosine). ``top`` (Q, F): each query's F added items (rows of ``signatures``). Returns (Q, F)."""
    lp = np.asarray(generative_logprob, dtype=np.float64)
    Q, F = top.shape
    out = np.zeros((Q, F))
    for i in range(Q):
        valid = [(c, v) for c, v in zip(cand_ids[i], lp[i]) if c is not None and np.isfinite(v)]
        if not valid:
            continue
        floor = min(v for _, v in valid)
        for j, t in enumerate(top[i].tolist()):
            sig = signatures[t]
            home = max(sig.values(), default=0.0)
            reach = [v + np.log(sig[c] / home) for c, v in valid if sig.get(c, 0.0) > 0]
            out[i, j] = max(reach + [floor])
    return out
