"""Training pairs with derived queries (issue 19 lever 2): base queries first, derived ones after.

A querygen backend may add queries derived from an item's base queries (``querygen.keep_captions``: the
paraphrase backend keeps caption i as ``caption/i`` and adds paraphrases of it as
``paraphrase/<prompt>/caption/i``). RUN/train_queries.json then holds the base pairs first, in the
order a captions-only run writes them, then the derived pairs; RUN/query_origins.json gives, for every
pair, the index of the base pair it derives from (its own index for a base pair, -1 for a derived pair
whose base was filtered out). Holding queries out (``split.scorer_queries``) picks base pairs only,
exactly as a run without derived queries does, and drops every query derived from a held-out one: no
paraphrase of a validation query is trained on.
"""
from __future__ import annotations

import re

import numpy as np

DERIVED = re.compile(r"^[^/]+/\d+/(caption/\d+)$")  # "paraphrase/<prompt>/caption/<i>" -> "caption/<i>"


class QueryPairsError(ValueError):
    """Pairs and their origins do not fit together; the message says how."""


def base_first(rows: list[tuple[str, str, str]]) -> tuple[list[tuple[str, str]], list[int] | None]:
    """(query, item_id, source) rows -> (pairs, origins): base pairs in their order, then derived pairs.

    origins is None when no row is derived (the pairs are the rows, unchanged)."""
    derived = [DERIVED.match(s or "") for _, _, s in rows]
    if not any(derived):
        return [(q, i) for q, i, _ in rows], None
    base = [(q, i, s) for (q, i, s), d in zip(rows, derived) if not d]
    index = {(i, s): n for n, (_, i, s) in enumerate(base)}
    pairs = [(q, i) for q, i, _ in base]
    origins = list(range(len(base)))
    for (q, i, _), d in zip(rows, derived):
        if d:
            pairs.append((q, i))
            origins.append(index.get((i, d.group(1)), -1))
    return pairs, origins


def check_origins(pairs: list, origins: list[int] | None) -> int:
    """The number of base pairs (a prefix of ``pairs``); QueryPairsError when the origins do not fit."""
    if origins is None:
        return len(pairs)
    if len(origins) != len(pairs):
        raise QueryPairsError(f"query origins name {len(origins)} pairs but there are {len(pairs)} training pairs; "
                              "re-run the querygen stage")
    n_base = next((k for k, o in enumerate(origins) if o != k), len(origins))
    if any(not (-1 <= o < n_base) or (k >= n_base and o == k) for k, o in enumerate(origins)):
        raise QueryPairsError("query origins must list the base pairs first (origin = own index), then derived "
                              "pairs (origin = a base pair's index or -1); re-run the querygen stage")
    return n_base


def hold_out_pairs(pairs: list[tuple[str, str]], n: int, *, seed: int, origins: list[int] | None = None,
                   error=ValueError) -> tuple[list, list]:
    """(kept, held) (query, item_id) pairs: ``n`` base pairs held out of training, at most one per item and
    never an item's last base query, chosen by a seeded permutation of the base pairs (kept pairs keep their
    order). With ``origins``, pairs derived from a held-out pair are in neither list."""
    if n <= 0:
        return list(pairs), []
    n_base = check_origins(pairs, origins)
    count: dict[str, int] = {}
    for _, iid in pairs[:n_base]:
        count[iid] = count.get(iid, 0) + 1
    held_idx, used = set(), set()
    for i in np.random.default_rng([seed, 7]).permutation(n_base).tolist():
        iid = pairs[i][1]
        if len(held_idx) >= n:
            break
        if iid not in used and count[iid] > 1:
            held_idx.add(i)
            used.add(iid)
    if len(held_idx) < n:
        raise error(f"split.scorer_queries={n}: only {len(held_idx)} items have more than one training "
                    f"query to hold one out from; lower split.scorer_queries")
    dropped = excluded(held_idx, origins)
    return ([p for i, p in enumerate(pairs) if i not in dropped],
            [p for i, p in enumerate(pairs) if i in held_idx])


def excluded(held_idx: set[int], origins: list[int] | None) -> set[int]:
    """The held-out pair indices plus those of the pairs derived from them."""
    if origins is None:
        return set(held_idx)
    return set(held_idx) | {k for k, o in enumerate(origins) if o in held_idx and o != k}
