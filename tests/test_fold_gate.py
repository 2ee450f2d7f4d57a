"""The fold's gate, replay sample and validation split (ace/pipeline/fold_gate.py) on constructed cases."""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from ace.pipeline import fold_gate


def test_gate_keeps_items_whose_generative_recall_is_below_the_fallback():
    generative = {"a": 0.0, "b": 100.0, "c": 50.0, "d": 100.0}
    fallback = {"a": 100.0, "b": 100.0, "c": 100.0, "d": 0.0}
    old = {"R@10": 60.0, "R@1": 30.0, "queries": 10}
    g = fold_gate.gate(["a", "b", "c", "d", "e"], generative, fallback, old, {**old, "R@10": 59.5},
                       k=10, max_old_drop=1.0)
    assert g["swap"] and g["folded"] == ["b", "d"]
    assert g["stayed"] == ["a", "c", "e"]
    assert "< fallback" in g["items"]["a"]["why"] and "no validation query" in g["items"]["e"]["why"]
    assert g["old_drop"] == pytest.approx(0.5)


def test_gate_refuses_the_swap_when_old_items_drop_by_the_bound():
    old = {"R@10": 60.0, "R@1": 30.0, "queries": 10}
    g = fold_gate.gate(["a"], {"a": 100.0}, {"a": 0.0}, old, {**old, "R@10": 59.0}, k=10, max_old_drop=1.0)
    assert not g["swap"] and g["folded"] == [] and g["stayed"] == ["a"]
    assert "drops by 1.00 points" in g["why"]
    report = fold_gate.format_gate_report({**g, "old_before": old, "old_after": {**old, "R@10": 59.0},
                                           "new_fallback": None, "new_generative": None})
    assert "not swapped" in report and "| a | swap refused" in report
    # every item worse: no swap whatever the old items do
    g = fold_gate.gate(["a"], {"a": 0.0}, {"a": 100.0}, old, old, k=10, max_old_drop=1.0)
    assert not g["swap"] and "no item" in g["why"]
    # gate off: everything is folded, the drop is only reported
    g = fold_gate.gate(["a"], {"a": 0.0}, {"a": 100.0}, old, {**old, "R@10": 10.0}, k=10, max_old_drop=1.0, enabled=False)
    assert g["swap"] and g["folded"] == ["a"] and g["old_drop"] == 50.0


def test_gate_refuses_the_swap_when_the_candidates_together_do_worse_than_before():
    """Constructed case of mscoco seed 0: most items pass one by one (both paths find their one query),
    yet the candidates together are served worse by the generative path: nothing is swapped in."""
    items = [f"i{n}" for n in range(10)]
    generative = {i: 100.0 for i in items[:7]} | {i: 0.0 for i in items[7:]}
    fallback = {i: 100.0 for i in items[:6]} | {i: 0.0 for i in items[6:7]} | {i: 100.0 for i in items[7:]}
    old = {"R@10": 60.0, "R@1": 30.0, "queries": 10}
    before, after = {"R@10": 90.0, "R@1": 50.0, "queries": 10}, {"R@10": 70.0, "R@1": 50.0, "queries": 10}
    args = dict(k=10, max_old_drop=1.0, new_before=before)
    g = fold_gate.gate(items, generative, fallback, old, old, **args, new_after=after)
    assert not g["swap"] and g["folded"] == [] and g["stayed"] == items
    assert g["new_drop"] == pytest.approx(20.0) and "the fallback serves them at least as well" in g["why"]
    g = fold_gate.gate(items, generative, fallback, old, old, **args, new_after=after, max_new_drop=25.0)
    assert g["swap"] and g["folded"] == items[:7]                 # within the allowed drop: per-item choice
    g = fold_gate.gate(items, generative, fallback, old, old, **args, new_after=before)
    assert g["swap"] and g["new_drop"] == 0.0                     # level is not worse


def test_paired_drop_is_the_mean_and_standard_error_of_the_per_query_differences():
    before = [True, True, True, False, True, False, True, True]
    after = [True, False, True, True, False, False, True, True]
    drop, se = fold_gate.paired_drop(before, after)
    d = [0, 100, 0, -100, 100, 0, 0, 0]                     # before - after, in points
    mean = sum(d) / 8
    assert drop == pytest.approx(mean) == pytest.approx(12.5)
    assert se == pytest.approx((sum((x - mean) ** 2 for x in d) / 7) ** 0.5 / 8 ** 0.5)
    assert fold_gate.paired_drop(before, before) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same queries"):
        fold_gate.paired_drop(before, after[:-1])
    with pytest.raises(ValueError, match="at least one"):
        fold_gate.paired_drop([], [])


def test_gate_refuses_a_drop_within_the_bound_that_the_validation_queries_cannot_vouch_for():
    """200 old validation queries, a measured drop of 0.5 R@10 (< max_old_drop 1.0) made of 9 queries lost
    and 8 gained: the standard error (~2 points) means a real loss of several points is as likely, so
    with z = 1.645 the swap is refused; z = 0 (point estimate) swaps; the same 0.5 drop with 1 query lost
    and none gained (error 0.5) is below the bound at z = 0.9 (upper bound 0.95) but not at 1.645 (1.32)."""
    n = 200
    before = [True] * 9 + [False] * 8 + [True] * 100 + [False] * 83
    after = [False] * 9 + [True] * 8 + [True] * 100 + [False] * 83
    old_b = {"R@10": 100.0 * sum(before) / n, "R@1": 30.0, "queries": n}
    old_a = {"R@10": 100.0 * sum(after) / n, "R@1": 30.0, "queries": n}
    args = dict(k=10, max_old_drop=1.0, old_hits=(before, after))
    g = fold_gate.gate(["a"], {"a": 100.0}, {"a": 0.0}, old_b, old_a, **args, z=1.645)
    assert g["old_drop"] == pytest.approx(0.5) and g["old_drop_se"] == pytest.approx(2.06, abs=0.01)
    assert not g["swap"] and "standard error" in g["why"] and g["old_drop_upper"] > 1.0
    assert fold_gate.gate(["a"], {"a": 100.0}, {"a": 0.0}, old_b, old_a, **args, z=0.0)["swap"]
    one = [True] + [True] * 100 + [False] * 99
    one_after = [False] + [True] * 100 + [False] * 99
    args = dict(k=10, max_old_drop=1.0, old_hits=(one, one_after))
    assert fold_gate.gate(["a"], {"a": 100.0}, {"a": 0.0}, old_b, old_a, **args, z=0.9)["swap"]
    assert not fold_gate.gate(["a"], {"a": 100.0}, {"a": 0.0}, old_b, old_a, **args, z=1.645)["swap"]


def test_gate_compares_the_candidates_drop_at_its_upper_bound():
    """The candidates level on average (2 queries lost, 2 gained of 10) are refused with z > 0 under
    max_new_drop 0: their validation queries cannot show the generative path is not worse; all ten
    found both before and after (no discordant query, error 0) swap."""
    items = [f"i{n}" for n in range(10)]
    per_item = {i: 100.0 for i in items}
    old = {"R@10": 60.0, "R@1": 30.0, "queries": 10}
    level = {"R@10": 80.0, "R@1": 50.0, "queries": 10}
    before = [True] * 8 + [False] * 2
    after = [False] * 2 + [True] * 8
    args = dict(k=10, max_old_drop=1.0, new_before=level, new_after=level, z=1.645)
    g = fold_gate.gate(items, per_item, per_item, old, old, **args, new_hits=(before, after))
    assert not g["swap"] and g["new_drop"] == 0.0 and g["new_drop_upper"] > 0
    g = fold_gate.gate(items, per_item, per_item, old, old, **args, new_hits=([True] * 10, [True] * 10))
    assert g["swap"] and g["new_drop_se"] == 0.0


def test_hold_out_per_item_never_takes_an_items_last_query():
    pairs = [(f"q{i}{j}", f"item{i}") for i in range(5) for j in range(i + 1)]   # item0 has 1 query, item4 5
    kept, held = fold_gate.hold_out_per_item(pairs, 2, seed=1)
    assert sorted(kept + held) == sorted(pairs)
    per = Counter(i for _, i in held)
    assert per["item0"] == 0 and per["item1"] == 1 and all(per[f"item{i}"] == 2 for i in (2, 3, 4))
    assert {i for _, i in kept} == {f"item{i}" for i in range(5)}
    _, limited = fold_gate.hold_out_per_item(pairs, 1, limit=2, seed=1)
    assert len(limited) == 2
    assert fold_gate.hold_out_per_item(pairs, 0) == (pairs, [])


def test_a_candidates_document_is_never_its_validation_query():
    """The query that is its item's document (what its embedding, identifier and hybrid vector stand on) stays in
    training: held out, the fold scores it far above a query a user would write. Over many seeds every item's
    validation query is one of its other queries; an item whose only query is its document has none."""
    cfg = SimpleNamespace(val_per_item=1, val_old=0, min_replay=0, replay_ratio=1.0, replay="random", replay_per_prefix=2)
    tok = SimpleNamespace(item_ids=[], codes=[])
    pairs = [(f"doc{i}", f"item{i}") for i in range(6)] + [(f"q{i}{j}", f"item{i}") for i in range(6) for j in range(i % 3)]
    documents = {f"item{i}": f"doc{i}" for i in range(6)}
    for seed in range(20):
        split = fold_gate.make_split(pairs, [], [], tok, [], SimpleNamespace(**vars(cfg), seed=seed), lambda i: True,
                                     documents=documents)
        assert not {q for q, _ in split["val_new"]} & set(documents.values())
        assert {i for _, i in split["val_new"]} == {f"item{i}" for i in range(6) if i % 3}   # item0, item3: document only
        assert sorted(split["train_new"] + split["val_new"]) == sorted(pairs)
    held = {q for seed in range(20) for q, _ in fold_gate.make_split(
        pairs, [], [], tok, [], SimpleNamespace(**vars(cfg), seed=seed), lambda i: True)["val_new"]}
    assert held & set(documents.values())   # without documents any query may be held out (the case it guards)


def test_structured_replay_covers_every_touched_prefix_then_stratifies():
    # 40 old items: k in 0..3, v1 in 0..4, u in 0..1 -> prefixes (k, v1) with 2 items each, 3 queries per item
    codes = {f"o{k}{v}{u}": (k, v, u) for k in range(4) for v in range(5) for u in range(2)}
    pool = [(f"{iid} q{j}", iid) for iid in codes for j in range(3)]
    new = [(1, 2, 5), (3, 4, 7), (2, 9, 0)]   # (1, 2) and (3, 4) shared with old items; (2, 9) only at k = 2
    replay, info = fold_gate.structured_replay(pool, codes, new, size=30, per_prefix=2, seed=0)
    assert info["touched_prefixes"] == 3 and info["touched_pairs"] == 6
    under = Counter(codes[i][:2] for _, i in replay)
    assert under[(1, 2)] >= 2 and under[(3, 4)] >= 2
    assert sum(1 for _, i in replay if codes[i][0] == 2) >= 2
    # round robin: the 2 pairs of a touched (k, v1) prefix come from its 2 different items
    assert len({i for _, i in replay if codes[i][:2] == (1, 2)}) == 2
    assert len(replay) == 30 and len(set(replay)) == 30
    strata = Counter(codes[i][0] for _, i in replay)
    assert all(strata[k] >= 6 for k in range(4))   # the stratified part spreads over every first-level code
    # the touched part is kept whole when the budget is smaller
    small, info = fold_gate.structured_replay(pool, codes, new, size=2, per_prefix=2, seed=0)
    assert len(small) == 6 and info["stratified_pairs"] == 0
    assert fold_gate.structured_replay([], codes, new, size=10)[0] == []


def test_make_split_uses_the_scorer_queries_as_old_validation_and_never_replays_them():
    codes = {f"o{k}{u}": (k, 0, u) for k in range(3) for u in range(3)}
    tok = SimpleNamespace(item_ids=list(codes), codes=[codes[i] for i in codes])
    pool = [(f"{i} q{j}", i) for i in codes for j in range(3)]
    scorer = [pool[0], pool[3]]
    new_pairs = [(f"n{j}", "new") for j in range(3)]
    cfg = SimpleNamespace(val_per_item=1, seed=0, val_old=10, min_replay=100, replay_ratio=1.0, replay="structured",
                          replay_per_prefix=2)
    split = fold_gate.make_split(new_pairs, pool, scorer, tok, [(0, 0, 9)], cfg, lambda i: True)
    assert split["val_old"] == sorted(scorer) and "scorer" in split["val_old_source"]
    assert not set(split["replay"]) & set(scorer) and len(split["replay"]) == len(pool) - 2
    assert len(split["val_new"]) == 1 and len(split["train_new"]) == 2
    split = fold_gate.make_split(new_pairs, pool, [], tok, [(0, 0, 9)], cfg, lambda i: True)
    assert len(split["val_old"]) == 9 and not set(split["replay"]) & set(split["val_old"])


def _scored(rows):
    return [[(iid, float(s)) for iid, s in row] for row in rows]


def test_fit_offset_lowers_folded_items_that_crowd_old_items_out():
    """Constructed case, k = 1: a folded item "f" outscores the old gold by 1 on the old queries and leads its
    own queries by 3; an offset in (-3, -1) ranks both golds first, 0 loses the old ones, -4 the new ones."""
    from ace.pipeline.fold_gate import fit_offset, shifted_rankings

    old_pairs = [("q1", "o1"), ("q2", "o2")]
    old_scored = _scored([[("f", 5), ("o1", 4)], [("f", 2), ("o2", 1)]])
    new_pairs = [("q3", "f")]
    new_scored = _scored([[("f", 6), ("o1", 3)]])
    kw = dict(k=1, max_old_drop=1.0, max_new_drop=0.0, z=0.0)
    fit = fit_offset([0.0, -2.0, -4.0], {"f"}, ([True, True], old_scored, old_pairs), ([True], new_scored, new_pairs), **kw)
    assert fit["offset"] == -2.0
    table = {r["offset"]: r for r in fit["table"]}
    assert table[0.0]["old_drop"] == 100.0 and table[0.0]["new_drop"] == 0.0
    assert table[-2.0]["old_drop"] == 0.0 and table[-2.0]["new_drop"] == 0.0 and table[-2.0]["margin"] == 0.0
    assert table[-4.0]["new_drop"] == 100.0
    assert shifted_rankings(old_scored, {"f"}, -2.0, 2) == [["o1", "f"], ["o2", "f"]]
    assert shifted_rankings(old_scored, set(), -2.0, 1) == [["f"], ["f"]]       # only the shifted items move
    # ties of the margin go to the offset nearest 0; an empty side does not count
    tie = fit_offset([-8.0, 2.5, -2.0], {"f"}, ([], [], []), ([True], new_scored, new_pairs), **kw)
    assert tie["offset"] == -2.0 and tie["table"][0]["old_drop"] is None


def test_cross_fit_ranks_each_half_with_the_offset_fitted_on_the_other_half():
    from ace.pipeline.fold_gate import cross_fit_offset, fit_offset, half_of, shifted_rankings

    items = [f"o{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    old_pairs = [(f"q{i}", iid) for i, iid in enumerate(items)]
    # per old query: the folded item "f" ahead of the gold by a random margin in (0, 4)
    old_scored = _scored([[("f", 10.0), (iid, 10.0 - m)] for iid, m in zip(items, rng.uniform(0, 4, len(items)))])
    new_pairs = [(f"n{i}", "f") for i in range(10)]
    new_scored = _scored([[("f", 10.0), ("o0", 10.0 - m)] for m in rng.uniform(2.5, 6, 10)])
    grid = [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    kw = dict(k=1, max_old_drop=1.0, max_new_drop=0.0, z=0.0)
    old = ([True] * len(old_pairs), old_scored, old_pairs)
    new = ([True] * len(new_pairs), new_scored, new_pairs)
    old_rank, new_rank, rec = cross_fit_offset(grid, {"f"}, old, new, **kw)
    assert {half_of(i) for i in items} == {0, 1}
    assert rec["offset"] == fit_offset(grid, {"f"}, old, new, **kw)["offset"] and len(rec["table"]) == len(grid)
    for h in (0, 1):
        other = [i for i, (_, iid) in enumerate(old_pairs) if half_of(iid) != h]
        want = fit_offset(grid, {"f"}, ([True] * len(other), [old_scored[i] for i in other], [old_pairs[i] for i in other]),
                          new if half_of("f") != h else ([], [], []), **kw)["offset"]
        assert rec["half_offsets"][h] == want
        for i, (_, iid) in enumerate(old_pairs):
            if half_of(iid) == h:
                assert old_rank[i] == shifted_rankings([old_scored[i]], {"f"}, want, 1)[0]
    same = cross_fit_offset([0.0], {"f"}, old, new, **kw)    # grid [0]: the candidates' own order
    assert same[0] == [[row[0][0]] for row in old_scored] and same[2]["offset"] == 0.0
    deep = cross_fit_offset(grid, {"f"}, old, new, **kw, depth=2)   # fitted at k = 1, rankings of 2
    assert deep[2] == rec and all(len(r) == 2 and r[:1] == o for r, o in zip(deep[0], old_rank))
