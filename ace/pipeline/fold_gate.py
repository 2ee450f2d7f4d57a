"""What a fold trains on and what it may swap in (issue 16, "fold without forgetting"):

- ``hold_out_per_item``: validation queries split from training queries (at most ``per_item`` per
  item, never an item's last one), for the gate;
- ``structured_replay``: the old pairs replayed next to the new ones: every identifier prefix the
  new items touch (the deepest prefix each shares with old items) gets ``per_prefix`` old pairs,
  the rest of the budget is a sample stratified by the first identifier level;
- ``gate``: per new item, generative recall after fine-tuning vs fallback recall before it on its
  validation queries (items below stay in the fallback); the swap happens only when the candidates
  together lose at most ``max_new_drop`` and old items less than ``max_old_drop`` R@k points, each drop
  taken at its upper confidence bound (``paired_drop``: drop + z x its paired standard error over the
  same validation queries) so that a gate on a few hundred queries does not swap on noise;
- ``fit_offset`` / ``cross_fit_offset``: a log-prob offset for the folded items on a hybrid run (a freshly
  fine-tuned decoder's log-probs of the items it was just trained on need not be on the old items' scale:
  too high crowds old items out of the top k, too low hides the new ones), the one of a grid the gate is most likely to pass with, fitted on one half of the validation
  queries and measured on the other so that the gate does not select on the queries it tests;
- ``format_gate_report``: the Markdown part of the fold report saying what was folded, what stayed, why.
"""
from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np

from ace.metrics import retrieval_metrics


def hold_out_per_item(pairs: list[tuple[str, str]], per_item: int, *, limit: int | None = None,
                      seed: int = 0, keep=frozenset()) -> tuple[list, list]:
    """(kept, held) (query, item_id) pairs: up to ``per_item`` pairs of each item held out, never its
    last one and never a pair in ``keep``, at most ``limit`` in all, chosen by a seeded permutation (both
    lists keep their order)."""
    if per_item <= 0 or (limit is not None and limit <= 0):
        return list(pairs), []
    left: dict[str, int] = defaultdict(int)
    for _, iid in pairs:
        left[iid] += 1
    held: set[int] = set()
    taken: dict[str, int] = defaultdict(int)
    for i in np.random.default_rng([seed, 16]).permutation(len(pairs)).tolist():
        if limit is not None and len(held) >= limit:
            break
        iid = pairs[i][1]
        if taken[iid] < per_item and left[iid] > 1 and tuple(pairs[i]) not in keep:
            held.add(i)
            taken[iid] += 1
            left[iid] -= 1
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def structured_replay(pool: list[tuple[str, str]], codes: dict[str, tuple], new_codes: list[tuple], size: int,
                      *, per_prefix: int = 2, seed: int = 0) -> tuple[list, dict]:
    """Old (query, item_id) pairs to replay: every prefix touched by the new items first, then a
    sample stratified by the first identifier level up to ``size`` pairs in all (the touched part is
    kept whole when it alone exceeds ``size``). ``codes``: item id -> identifier of the pool's items;
    ``new_codes``: the new items' identifiers. Returns (pairs in pool order, summary)."""
    rng = np.random.default_rng([seed, 61])
    if not pool or size <= 0:
        return [], {"touched_prefixes": 0, "touched_pairs": 0, "stratified_pairs": 0}
    by_item: dict[str, list[int]] = defaultdict(list)
    for j, (_, iid) in enumerate(pool):
        by_item[iid].append(j)
    items = list(by_item)
    length = len(next(iter(codes.values()))) - 1           # prefix levels (k, v1..vM); u is per item
    under: list[dict[tuple, list[str]]] = [defaultdict(list) for _ in range(length + 1)]
    for iid in items:
        c = tuple(codes[iid])
        for d in range(1, length + 1):
            under[d][c[:d]].append(iid)
    touched: set[tuple] = set()
    for c in new_codes:                                    # the deepest prefix shared with old items
        for d in range(length, 0, -1):
            if tuple(c[:d]) in under[d]:
                touched.add(tuple(c[:d]))
                break
    chosen: set[int] = set()
    for prefix in sorted(touched):
        members = under[len(prefix)][prefix]
        shuffled = [members[m] for m in rng.permutation(len(members))]
        order: list[int] = []   # round robin over the prefix's items: per_prefix pairs cover as many items as possible
        for r in range(max(len(by_item[iid]) for iid in members)):
            order += [by_item[iid][r] for iid in shuffled if r < len(by_item[iid])]
        chosen.update(order[:per_prefix])
    n_touched = len(chosen)
    rest = [j for j in range(len(pool)) if j not in chosen]
    budget = max(0, min(size, len(pool)) - n_touched)
    if budget and rest:                                    # proportional allocation over the first level
        strata: dict[int, list[int]] = defaultdict(list)
        for j in rest:
            strata[int(codes[pool[j][1]][0])].append(j)
        keys = sorted(strata)
        share = np.array([len(strata[k]) for k in keys], dtype=np.float64) * budget / len(rest)
        take = np.floor(share).astype(int)
        for i in np.argsort(-(share - take))[:budget - int(take.sum())]:
            take[i] += 1
        for k, n in zip(keys, take):
            members = strata[k]
            chosen.update(members[i] for i in rng.permutation(len(members))[:n])
    picked = sorted(chosen)
    return [pool[j] for j in picked], {"touched_prefixes": len(touched), "touched_pairs": n_touched,
                                       "stratified_pairs": len(picked) - n_touched}


def make_split(pairs, pool, scorer, tok, new_identifiers, cfg, on_path, documents: dict | None = None) -> dict:
    """What a fold trains and validates on. ``pairs``: the candidates' generated (query, item_id) pairs;
    ``pool``: old training pairs of the items on the generative path; ``scorer``: the run's training
    queries held out of training (RUN/scorer_queries.json: never replayed, the old validation queries
    when present, else ``val_old`` pool pairs left out of the replay); ``tok``: the identifiers;
    ``new_identifiers``: the candidates' identifiers; ``cfg``: the FoldConfig; ``documents``: candidate id ->
    its document (``CorpusItem.description()``). A query that is its item's document is never a validation
    query: the document is what the item stands on (its caption-proxy embedding, hence its identifier and
    prototype; its hybrid vector), so the fold's own training on it scores it far above a query a user
    would write (mscoco 80/20, seed 0, fold 1: +7.6 R@10 from the fold on such queries, +1.2 on the others, +0.8
    on held-out test; BENCHMARKS new_items, session 16)."""
    keep = {(q, i) for q, i in pairs if documents and q == documents.get(i)}
    train_new, val_new = hold_out_per_item(pairs, cfg.val_per_item, seed=cfg.seed, keep=keep)
    held = set(scorer)
    pool = [p for p in pool if p not in held]
    if cfg.val_old and held:
        val_old = sorted(p for p in held if on_path(p[1]))
        if len(val_old) > cfg.val_old:
            val_old = [val_old[i] for i in sorted(np.random.default_rng(cfg.seed).permutation(len(val_old))[:cfg.val_old])]
        source = "scorer queries (held out of training)"
    else:
        pool, val_old = hold_out_per_item(pool, 1, limit=cfg.val_old, seed=cfg.seed)
        source = "old training pairs left out of the replay (the previous model trained on them)"
    n_replay = min(len(pool), max(cfg.min_replay, int(round(cfg.replay_ratio * len(train_new)))))
    if cfg.replay == "structured" and pool:
        row = {iid: i for i, iid in enumerate(tok.item_ids)}
        codes = {iid: tuple(int(c) for c in tok.codes[row[iid]]) for iid in {i for _, i in pool}}
        replay, info = structured_replay(pool, codes, [tuple(c) for c in new_identifiers], n_replay,
                                         per_prefix=cfg.replay_per_prefix, seed=cfg.seed)
    else:
        pick = np.random.default_rng(cfg.seed).permutation(len(pool))[:n_replay]
        replay, info = [pool[i] for i in sorted(pick)], {}
    return {"train_new": train_new, "val_new": val_new, "replay": replay, "val_old": val_old,
            "replay_info": {"kind": cfg.replay, "pool": len(pool), **info}, "val_old_source": source}


def hits(rankings: list[list[str]], pairs: list[tuple[str, str]], k: int) -> list[bool]:
    """Per (query, item_id) pair: is the item among the first k of its ranking."""
    return [t in row[:k] for row, (_, t) in zip(rankings, pairs)]


def per_item_recall(hit: list[bool], pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Item id -> share of its validation queries answered in the top k (percent)."""
    got: dict[str, list[bool]] = defaultdict(list)
    for h, (_, iid) in zip(hit, pairs):
        got[iid].append(bool(h))
    return {iid: 100.0 * sum(v) / len(v) for iid, v in got.items()}


def metrics(rankings: list[list[str]], pairs: list[tuple[str, str]]) -> dict | None:
    return retrieval_metrics(rankings, [t for _, t in pairs]) if pairs else None


def paired_drop(before: list[bool], after: list[bool]) -> tuple[float, float]:
    """(drop, standard error), in recall points, of hits ``before`` -> ``after`` on the same queries (paired)."""
    if len(before) != len(after):
        raise ValueError(f"paired recall needs the same queries before and after: {len(before)} vs {len(after)} hits")
    if not before:
        raise ValueError("paired recall needs at least one query")
    d = 100.0 * (np.asarray(before, dtype=np.float64) - np.asarray(after, dtype=np.float64))
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    return float(d.mean()), se


def _bound(drop: float | None, hits: tuple | None, z: float) -> tuple[float | None, float | None]:
    """(standard error of ``drop`` from its per-query ``hits`` (before, after) or None, drop + z x that error)."""
    if drop is None:
        return None, None
    if not hits or z == 0:
        return None, drop
    _, se = paired_drop(*hits)
    return se, drop + z * se


def gate(items: list[str], generative: dict[str, float], fallback: dict[str, float], old_before: dict | None,
         old_after: dict | None, *, k: int, max_old_drop: float, enabled: bool = True, new_before: dict | None = None,
         new_after: dict | None = None, max_new_drop: float = 0.0, old_hits: tuple | None = None,
         new_hits: tuple | None = None, z: float = 0.0) -> dict:
    """The fold gate's decision. ``generative`` / ``fallback``: item -> recall@k on its validation
    queries (after fine-tuning / before, through the fallback). An item is folded when its
    generative recall is not below its fallback recall; an item without validation queries stays
    (no evidence). The swap happens when (1) all candidates together (``new_before`` -> ``new_after``,
    ``retrieval_metrics`` of their validation queries before any selection: a per-item choice on one
    query each cannot tell that the generative path is worse overall) lose at most ``max_new_drop``
    points of R@k, and (2) old-item R@k (``old_before`` -> ``old_after``,
    the old validation queries) drops by less than ``max_old_drop`` points. With ``old_hits`` / ``new_hits``
    (per-query hits at k, (before, after), on the same queries as those metrics) and ``z`` > 0 each drop is
    compared at its upper bound drop + z x its paired standard error (``paired_drop``): the gate swaps only
    when the loss is below the bound with that confidence, not when noise happens to hide it.
    ``enabled=False`` folds every item (the gate only measures)."""
    key = f"R@{k}"
    decisions = {}
    for iid in items:
        g, f = generative.get(iid), fallback.get(iid)
        if not enabled:
            decisions[iid] = {"fold": True, "why": "gate off", "generative": g, "fallback": f}
        elif g is None:
            decisions[iid] = {"fold": False, "why": "no validation query (stays in the fallback)",
                              "generative": None, "fallback": f}
        elif g < (f or 0.0):
            decisions[iid] = {"fold": False, "why": f"generative R@{k} {g:.0f} < fallback {f:.0f}",
                              "generative": g, "fallback": f}
        else:
            decisions[iid] = {"fold": True, "why": f"generative R@{k} {g:.0f} >= fallback {(f or 0.0):.0f}",
                              "generative": g, "fallback": f}
    drop = None if old_before is None or old_after is None else old_before[key] - old_after[key]
    passing = [i for i in items if decisions[i]["fold"]]
    new_drop = None if new_before is None or new_after is None else new_before[key] - new_after[key]
    old_se, old_upper = _bound(drop, old_hits, z)
    new_se, new_upper = _bound(new_drop, new_hits, z)

    def at_bound(d, se, upper):
        return f"{d:.2f} points" + ("" if se is None else f" (± {se:.2f} standard error; upper bound {upper:.2f} at z={z:g})")

    if not passing:
        swap, why = False, "no item does at least as well on the generative path as in the fallback"
    elif enabled and new_drop is not None and new_upper > max_new_drop:
        swap, why = False, (f"the candidates' {key} on their validation queries is {new_after[key]:.1f} on the generative "
                            f"path after fine-tuning against {new_before[key]:.1f} before the fold: a drop of "
                            f"{at_bound(new_drop, new_se, new_upper)}, more than max_new_drop={max_new_drop}: the "
                            f"fallback serves them at least as well, as far as these queries can tell")
    elif enabled and drop is not None and old_upper >= max_old_drop:
        swap, why = False, (f"old-item {key} on the validation queries drops by {at_bound(drop, old_se, old_upper)} "
                            f"({old_before[key]:.1f} -> {old_after[key]:.1f}), not less than max_old_drop={max_old_drop}")
    else:
        swap = True
        why = ("gate off" if not enabled else "no old-item validation queries" if drop is None else
               f"old-item {key} drop {at_bound(drop, old_se, old_upper)} < max_old_drop={max_old_drop}")
    return {"swap": swap, "why": why, "k": k, "old_drop": drop, "max_old_drop": max_old_drop,
            "new_drop": new_drop, "max_new_drop": max_new_drop, "z": z, "old_drop_se": old_se,
            "old_drop_upper": old_upper, "new_drop_se": new_se, "new_drop_upper": new_upper,
            "folded": passing if swap else [], "stayed": [i for i in items if not (swap and decisions[i]["fold"])],
            "items": decisions}


def shifted_rankings(scored: list[list[tuple[str, float]]], shifted: set[str], offset: float, k: int) -> list[list[str]]:
    """Top-k item ids of each query's scored candidates ``[(item_id, score), ...]`` with ``offset`` added to the
    scores of the items in ``shifted`` (a stable sort: ties keep the candidates' order)."""
    out = []
    for row in scored:
        score = [s + offset if iid in shifted else s for iid, s in row]
        order = sorted(range(len(row)), key=lambda j: -score[j])
        out.append([row[j][0] for j in order[:k]])
    return out


def _side(before: list[bool], scored, pairs, shifted, offset, k, bound, z) -> tuple[float, float, float] | None:
    """(drop, upper bound, bound - upper) of one side's validation queries at ``offset``; None without queries."""
    if not pairs or not before:
        return None
    after = hits(shifted_rankings(scored, shifted, offset, k), pairs, k)
    drop, _ = paired_drop(before, after)
    _, upper = _bound(drop, (before, after), z)
    return drop, upper, bound - upper


def fit_offset(grid, shifted: set[str], old: tuple, new: tuple, *, k: int, max_old_drop: float, max_new_drop: float,
               z: float) -> dict:
    """The offset of ``grid`` the gate is most likely to pass with. ``old`` / ``new``: (per-query hits before,
    scored candidates after [(item_id, score), ...] per query, (query, item_id) pairs) of the old items' and the
    candidates' validation queries. Per offset, each side's drop at its upper bound as ``gate`` takes it; the
    offset with the largest margin min(max_old_drop - old upper, max_new_drop - new upper) wins (a side without
    queries does not count), ties to the offset nearest 0. Returns {"offset", "table": one row per offset}."""
    table = []
    for off in grid:
        o = _side(*old, shifted, off, k, max_old_drop, z)
        n = _side(*new, shifted, off, k, max_new_drop, z)
        margins = [x[2] for x in (o, n) if x is not None]
        table.append({"offset": float(off), "old_drop": o and o[0], "old_upper": o and o[1],
                      "new_drop": n and n[0], "new_upper": n and n[1],
                      "margin": min(margins) if margins else 0.0})
    best = max(table, key=lambda r: (round(r["margin"], 9), -abs(r["offset"])))
    return {"offset": best["offset"], "table": table}


def half_of(item_id: str) -> int:
    """0 or 1: the half of the validation queries an item's queries belong to (a stable hash of its id)."""
    return zlib.crc32(item_id.encode("utf-8", "surrogatepass")) & 1


def cross_fit_offset(grid, shifted: set[str], old: tuple, new: tuple, *, k: int, max_old_drop: float,
                     max_new_drop: float, z: float, depth: int | None = None) -> tuple[list[list[str]], list[list[str]], dict]:
    """(old rankings, new rankings, record): ``fit_offset`` cross-fitted. The validation queries are split in two
    halves by item (``half_of``); each half is ranked with the offset fitted on the other, so the figures the
    gate compares were not used to choose the offset that produced them. The record holds the offset fitted on
    all the queries (the one to serve), each half's, and the table over all the queries. The offsets are fitted on
    recall at ``k`` (the gate's); the rankings keep the top ``depth`` (default ``k``)."""
    kw = dict(k=k, max_old_drop=max_old_drop, max_new_drop=max_new_drop, z=z)

    def part(side, h):
        before, scored, pairs = side
        keep = [i for i, (_, iid) in enumerate(pairs) if half_of(iid) == h]
        return [before[i] for i in keep] if before else [], [scored[i] for i in keep], [pairs[i] for i in keep]

    ranks = {"old": [None] * len(old[2]), "new": [None] * len(new[2])}
    halves = []
    for h in (0, 1):
        fitted = fit_offset(grid, shifted, part(old, 1 - h), part(new, 1 - h), **kw)["offset"]
        halves.append(fitted)
        for name, (_, scored, pairs) in (("old", old), ("new", new)):
            for i, (_, iid) in enumerate(pairs):
                if half_of(iid) == h:
                    ranks[name][i] = shifted_rankings([scored[i]], shifted, fitted, depth or k)[0]
    whole = fit_offset(grid, shifted, old, new, **kw)
    return ranks["old"], ranks["new"], {"offset": whole["offset"], "half_offsets": halves, "table": whole["table"],
                                        "grid": [float(g) for g in grid]}


def format_gate_report(g: dict, cost: dict | None = None, limit: int = 20) -> str:
    """Markdown: the gate's decision, the recall it compared and what was folded / stayed."""
    k = g["k"]
    path = "generative path, hybrid-scored" if g.get("path") == "hybrid" else "generative path"

    def cell(m):
        return "-" if m is None else f"{m['R@1']:.1f} / {m[f'R@{k}']:.1f} ({m['queries']} q)"

    lines = ["## Gate", "", f"**{'swapped in' if g['swap'] else 'not swapped'}**: {g['why']}.", "",
             f"| validation queries (split from training queries), R@1 / R@{k} | before the fold | after fine-tuning |",
             "| --- | --- | --- |",
             f"| old items, {path} | {cell(g.get('old_before'))} | {cell(g.get('old_after'))} |",
             f"| new items: {g.get('fallback_bar', 'fallback alone')} before, {path} after | "
             f"{cell(g.get('new_fallback'))} | {cell(g.get('new_generative'))} |"]
    if g.get("new_fallback_alone") and g.get("fallback_bar", "fallback alone") != "fallback alone":
        lines.append(f"| new items: fallback alone (ranks the added items only) | {cell(g['new_fallback_alone'])} | - |")
    cal = g.get("calibration")
    if cal:
        lines += ["", f"Folded items' log-prob offset: {cal['offset']:+g} (fitted on all the validation queries; "
                      f"the figures above rank each half of them with the offset fitted on the other half, "
                      f"{cal['half_offsets'][0]:+g} / {cal['half_offsets'][1]:+g}). Per offset, on all the queries:", "",
                  "| offset | old items: drop (upper bound) | candidates: drop (upper bound) | margin |",
                  "| --- | --- | --- | --- |"]

        def drop(d, u):
            return "-" if d is None else f"{d:.2f} ({u:.2f})"

        lines += [f"| {r['offset']:+g} | {drop(r['old_drop'], r['old_upper'])} | {drop(r['new_drop'], r['new_upper'])} "
                  f"| {r['margin']:.2f} |" for r in cal["table"]]
    lines += ["",
             f"{len(g['folded'])} item(s) folded, {len(g['stayed'])} stay in the fallback (still served there)."]
    if cost:
        line = (f"Fine-tuning cost per candidate item: {cost.get('steps_per_item', 0):.2f} steps, "
                f"{cost.get('seconds_per_item', 0):.2f} s ({cost.get('items', 0)} candidates)")
        if cost.get("steps_per_folded_item") is not None:
            line += (f"; per folded item: {cost['steps_per_folded_item']:.2f} steps, "
                     f"{cost['seconds_per_folded_item']:.2f} s")
        lines.append(line + ".")
    stayed = [i for i in g["stayed"]][:limit]
    if stayed:
        lines += ["", "| stayed in the fallback | why |", "| --- | --- |"]
        lines += [f"| {i} | {g['items'][i]['why'] if g['swap'] else 'swap refused: ' + g['why']} |" for i in stayed]
        if len(g["stayed"]) > limit:
            lines.append(f"| ... {len(g['stayed']) - limit} more (fold_report.json) | |")
    return "\n".join(lines) + "\n"
