"""Mean and spread over seeds of ``bench_new_items.py --folds N`` results (issue 16): one table per round.

    python benchmarks/fold_seeds.py benchmarks/out/new_items_coco/s*/seed*.json

Rows: old items (generative path, merged search) before adds, after adds and after the fold; this
round's new items and earlier rounds' items through merged search; the folded items' own held-out
test recall (fallback alone / merged search before the fold, generative path / merged search after);
then the gate's decisions and the fold's cost. Cells are mean +- standard deviation (ddof 1) over the
files, "-" where a file has no figure (e.g. no item folded).
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def cell(values: list) -> str:
    """'R@1 / R@10' mean +- sd over seeds of retrieval_metrics dicts (None entries skipped)."""
    got = [v for v in values if v]
    if not got:
        return "-"

    def one(key):
        x = np.array([v[key] for v in got], dtype=float)
        return f"{x.mean():.1f}" + (f" ± {x.std(ddof=1):.1f}" if len(x) > 1 else "")
    return f"{one('R@1')} / {one('R@10')}" + (f" ({len(got)} of {len(values)})" if len(got) < len(values) else "")


def gate_cell(gate: dict) -> str:
    """'no swap; 78.4 -> 75.8 / 65.0 -> 66.0; offset -2': the gate's decision, the validation R@k it compared and
    the folded items' log-prob offset it fitted (a gate that calibrates)."""
    if not gate:
        return "-"
    k = f"R@{gate.get('k', 10)}"

    def pair(a, b):
        return "-" if not (gate.get(a) and gate.get(b)) else f"{gate[a][k]:.1f} -> {gate[b][k]:.1f}"
    cal = gate.get("calibration")
    offset = "" if not cal else f"; offset {cal['offset']:+g}"
    return (f"{'swap' if gate.get('swap') else 'no swap'}; {pair('new_fallback', 'new_generative')} / "
            f"{pair('old_before', 'old_after')}{offset}")


def round_table(results: list[dict], rnd: int) -> str:
    recs = [r["rounds"][rnd] for r in results]
    first = [r["before_adds"] for r in results] if rnd == 0 else [None] * len(results)
    adds, after = [r["after_adds"] for r in recs], [r.get("after_fold") or {} for r in recs]
    test = [(r.get("fold") or {}).get("test") or {} for r in recs]
    tb, ta = [t.get("before") or {} for t in test], [t.get("after") or {} for t in test]

    def col(dicts, key):
        return cell([d.get(key) if d else None for d in dicts]) if any(dicts) else "-"

    rows = [("old items, generative path", col(first, "old_generative"), col(adds, "old_generative"),
             col(after, "old_generative")),
            ("old items, merged search", col(first, "old_merged"), col(adds, "old_merged"), col(after, "old_merged")),
            ("this round's new items, merged search", "-", col(adds, "new_merged"), col(after, "new_merged_all")),
            ("earlier rounds' items, merged search", "-", col(adds, "earlier_merged"), col(after, "earlier_merged")),
            ("folded items: fallback alone before / generative path after", "-", col(tb, "folded_fallback"),
             col(ta, "new_generative")),
            ("folded items: merged search before / after", "-", col(tb, "folded_merged"), col(ta, "folded_merged"))]
    lines = [f"Round {rnd + 1} ({len(results)} seeds; R@1 / R@10, mean ± sd)", "",
             "| held-out test queries | before adds | after adds | after the fold |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "| seed | candidates | folded | gate: swap?; validation R@10 before -> after, candidates / old items "
              "| fold s | steps | steps / folded item |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for res, rec in zip(results, recs):
        fold = rec.get("fold") or {}
        gate = fold.get("gate") or {}
        cost = fold.get("cost") or {}
        per = cost.get("steps_per_folded_item")
        lines.append(f"| {res.get('seed', '?')} | {fold.get('candidates', '-')} | {fold.get('items', '-')} | "
                     f"{gate_cell(gate)} | {fold.get('seconds') or 0:.0f} | {fold.get('steps', '-')} | "
                     f"{'-' if per is None else f'{per:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench_new_items.py --out JSON files, one per seed")
    args = ap.parse_args(argv)
    results = [json.loads(open(p).read()) for p in args.results]
    for res, path in zip(results, args.results):   # the bench's --seed, from its recorded command line
        words = res.get("command", "").split()
        res["seed"] = words[words.index("--seed") + 1] if "--seed" in words[:-1] else path
    rounds = min(len(r["rounds"]) for r in results)
    print("\n\n".join(round_table(results, i) for i in range(rounds)))


if __name__ == "__main__":
    main()
