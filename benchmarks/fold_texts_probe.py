"""Why the fold gate's candidate figures read higher on validation than on held-out test (issue 16): the number
of texts in the candidates' item vectors.

    python benchmarks/fold_texts_probe.py RUN_DIR [--fold N] [--out probe.json]

A diagnostic on a run just after fold N swapped in. A validation query is one of its item's training texts, so
the gate must keep it out of the item's vector: on validation a candidate's vector averages one text fewer than
it does when served. This re-runs the gate's hybrid scoring (``fold_measure.hybrid_scored``, as merged search
serves) before the fold (RUN/model.prev, every candidate in the fallback) and after it (RUN/model) on

- the folded items' held-out test queries (fold_dir/test_pairs.json), as served after the fold (the folded
  items on the generative path with their served offset, the rest in the fallback; also re-ranked at
  ``--offsets``), with the candidates' vectors built from all their texts (the fold report's figures),
  without their validation query (as the gate sees them), and without one more text; the fold report's old-item
  test queries, after the fold at each offset;
- the candidates' validation queries (fold_dir/split.json) as the gate measured them (every candidate on the
  path, the offset cross-fitted by ``fold_gate.cross_fit_offset``; gate.json's figures), and again with one more
  text out of each candidate's vector; split by whether the validation query is its item's document (the
  text its caption-proxy embedding, identifier and vector stand on; ``fold_gate.make_split`` no longer holds
  those out).

If the test change with one text fewer matches the validation change, the gap between the gate's figure and
held-out test is the vectors' text count, not the queries.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ace.model.modeling import AceModel  # noqa: E402
from ace.newitems.hybrid import read_offsets  # noqa: E402
from ace.pipeline import fold_gate  # noqa: E402
from ace.pipeline.fold import Fold, FoldError, swapped_fold  # noqa: E402
from ace.pipeline.fold_measure import GateView, gate_k, gate_scorer, hybrid_scored  # noqa: E402
from ace.run_folder import RunPaths  # noqa: E402
from ace.serving.store import open_run_store  # noqa: E402
from identifiers import SemanticIdTokenizer  # noqa: E402


def one_more_text(items, held: dict[str, set[str]], seed: int) -> list[tuple[str, str]]:
    """(text, item_id): per item, one more of its texts (seeded) outside ``held``, never its last one."""
    rng = np.random.default_rng([seed, 73])
    out = []
    for it in items:
        texts = [t for t in dict.fromkeys([it.description() or "", *it.captions]) if t and t not in held.get(it.item_id, ())]
        if len(texts) > 1:
            out.append((texts[int(rng.integers(len(texts)))], it.item_id))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--fold", type=int, default=None, help="the fold (default: the latest)")
    ap.add_argument("--offsets", type=float, nargs="*", default=None,
                    help="test: the folded items' offsets to re-rank the served search at, besides the served one "
                         "(default: the fold's offset_grid)")
    ap.add_argument("--out", default=None, help="JSON: the figures, and the validation queries' per-query hits "
                                                "and scored candidates (to re-run the gate on them)")
    args = ap.parse_args(argv)
    run, paths = Path(args.run), RunPaths(args.run)
    try:
        fold_dir, state, plan, cfg = swapped_fold(run, args.fold)
    except FoldError as exc:
        sys.exit(str(exc))
    prev_model, prev_ids = run / f"{RunPaths.MODEL}.prev", run / f"{RunPaths.IDENTIFIERS}.prev"
    if not (prev_model.is_dir() and prev_ids.is_dir()):
        sys.exit(f"{run}: the model before fold {fold_dir.name} ({prev_model}, {prev_ids}) is gone")
    split = {k: [tuple(p) for p in v] for k, v in json.loads((fold_dir / "split.json").read_text()).items()
             if k in ("val_new", "val_old")}
    folded = set(state["items"])
    candidates = state.get("candidates", sorted(folded))
    stayed = [i for i in candidates if i not in folded]
    test = [tuple(p) for p in json.loads((fold_dir / "test_pairs.json").read_text()) if p[1] in folded]

    tok = SemanticIdTokenizer.load(prev_ids, device="cpu")      # as the gate had it: old items + every candidate
    old_rows = list(range(len(tok.item_ids)))
    tok.restore(np.asarray([plan["identifiers"][plan["items"].index(i)] for i in candidates], dtype=np.int64), candidates)
    row = {iid: r for r, iid in enumerate(tok.item_ids)}
    store = open_run_store(run)
    try:
        def items_of(ids):
            return [store.get(i).to_corpus_item() for i in ids]

        scorer = gate_scorer(run, cfg)
        if scorer is None:
            sys.exit(f"{run} has no hybrid scorer (RUN/hybrid)")
        candidate_items = items_of(candidates)
        documents = {it.item_id: it.description() for it in candidate_items}
        extra = one_more_text(candidate_items, {iid: {q} for q, iid in split["val_new"]}, cfg.seed)
        views = {"all texts": GateView(run, scorer, {"val_old": [], "val_new": []}, items_of),
                 "no val query": GateView(run, scorer, {"val_old": [], "val_new": split["val_new"]}, items_of),
                 "one more out": GateView(run, scorer, {"val_old": [], "val_new": split["val_new"] + extra}, items_of),
                 "gate (val)": GateView(run, scorer, split, items_of),
                 "gate, one more out": GateView(run, scorer, {**split, "val_new": split["val_new"] + extra}, items_of)}
        before_model = AceModel.from_pretrained(str(prev_model)).eval()
        after_model = AceModel.from_pretrained(str(paths.model)).eval()
        before_off, after_off = read_offsets(prev_model / RunPaths.FOLDED_OFFSETS), read_offsets(paths.folded_offsets)
        served = {after_off.get(i, 0.0) for i in folded}     # one fold stages one offset for all its items
        if len(served) != 1:
            sys.exit(f"{fold_dir}: the folded items are served with several offsets {sorted(served)}; expected one")
        served = served.pop()
        k, depth = gate_k(cfg), cfg.top_k
        served_rows = old_rows + [row[i] for i in sorted(folded)]   # after the fold: the folded items on the path
        offsets = sorted({served, *(cfg.offset_grid if args.offsets is None else args.offsets)}, reverse=True)
        out = {"run": str(run), "fold": fold_dir.name, "served_offset": served, "test": [], "validation": []}

        def before(pairs, view):   # as served before the fold: every candidate in the fallback
            return hybrid_scored(run, cfg, before_model, tok, old_rows, pairs, view, fallback=candidates, offsets=before_off)

        def top(scored):
            return [[i for i, _ in r[:depth]] for r in scored]

        print(f"{fold_dir}: {len(folded)} folded, {len(stayed)} stayed; served offset {served:+g}; "
              f"{len(test)} test and {len(split['val_new'])} validation queries of the candidates")
        for key in ("all texts", "no val query", "one more out") if test else ():
            mb = fold_gate.metrics(top(before(test, views[key])), test)
            after = hybrid_scored(run, cfg, after_model, tok, served_rows, test, views[key], fallback=stayed,
                                  offsets=after_off)   # as served after the fold
            by_offset = {off: fold_gate.metrics(fold_gate.shifted_rankings(after, folded, off - served, depth), test)
                         for off in offsets}
            out["test"].append({"vectors": key, "n": len(test), "before": mb, "after": by_offset[served],
                                "after_by_offset": {f"{o:g}": m for o, m in by_offset.items()}})
            _line("test", key, len(test), mb, by_offset[served], k)
            print("    after at offset " + "  ".join(f"{o:+g}: {m['R@1']:.1f} / {m[f'R@{k}']:.1f}" for o, m in by_offset.items()))
        old_test, _ = Fold(run, cfg)._held_out(lambda iid: True, set(candidates))   # the fold report's old-item queries
        if old_test:
            after = hybrid_scored(run, cfg, after_model, tok, served_rows, old_test, views["all texts"],
                                  fallback=stayed, offsets=after_off)
            by_offset = {f"{o:g}": m for o, m in ((off, fold_gate.metrics(fold_gate.shifted_rankings(
                after, folded, off - served, depth), old_test)) for off in offsets)}
            out["test_old"] = {"n": len(old_test), "after_by_offset": by_offset}
            print("test, old items: after at offset " + "  ".join(f"{o}: {m['R@1']:.1f} / {m[f'R@{k}']:.1f}"
                                                                  for o, m in by_offset.items()))
        every = old_rows + [row[i] for i in candidates]   # the gate's "after": every candidate on the path
        for key in ("gate (val)", "gate, one more out"):
            view = views[key]
            sides = []
            for name in ("val_old", "val_new"):
                b = top(before(split[name], view)) if name == "val_new" or cfg.old_bar == "served" else None
                scored = hybrid_scored(run, cfg, after_model, tok, every, split[name], view, offsets=before_off)
                sides.append((b, scored))
            if sides[0][0] is None:   # old_bar=unshared: the old items among themselves
                sides[0] = (top(hybrid_scored(run, cfg, before_model, tok, old_rows, split["val_old"], view,
                                              offsets=before_off)), sides[0][1])
            (ob, o_scored), (nb, n_scored) = sides
            old_rank, new_rank, cal = fold_gate.cross_fit_offset(
                cfg.offset_grid if cfg.calibrate else [0.0], set(candidates),
                (fold_gate.hits(ob, split["val_old"], k), o_scored, split["val_old"]),
                (fold_gate.hits(nb, split["val_new"], k), n_scored, split["val_new"]), k=k,
                max_old_drop=cfg.max_old_drop, max_new_drop=cfg.max_new_drop, z=cfg.gate_z, depth=depth)
            mb, ma = fold_gate.metrics(nb, split["val_new"]), fold_gate.metrics(new_rank, split["val_new"])
            out["validation"].append({"vectors": key, "n": len(split["val_new"]), "before": mb, "after": ma,
                                      "old_before": fold_gate.metrics(ob, split["val_old"]),
                                      "old_after": fold_gate.metrics(old_rank, split["val_old"]),
                                      "offset": cal["offset"], "half_offsets": cal["half_offsets"], "table": cal["table"],
                                      "hits": {"new_before": fold_gate.hits(nb, split["val_new"], k),
                                               "new_scored": n_scored, "old_before": fold_gate.hits(ob, split["val_old"], k),
                                               "old_scored": o_scored}})
            _line("validation", key, len(split["val_new"]), mb, ma, k)
            for label, mine in (("query = its document", True), ("other queries", False)):   # the document leak
                sub = [j for j, (q, iid) in enumerate(split["val_new"]) if (q == documents.get(iid)) == mine]
                if sub:
                    pick = [split["val_new"][j] for j in sub]
                    sb, sa = (fold_gate.metrics([r[j] for j in sub], pick) for r in (nb, new_rank))
                    out["validation"][-1][label] = {"n": len(sub), "before": sb, "after": sa}
                    _line("", f"  {label}", len(sub), sb, sa, k)
            print(f"    cross-fitted offset {cal['offset']:+g} (halves {cal['half_offsets'][0]:+g} / {cal['half_offsets'][1]:+g})")
    finally:
        store.close()
    if args.out:
        Path(args.out).write_text(json.dumps(out))


def _line(queries: str, vectors: str, n: int, before: dict, after: dict, k: int) -> None:
    print(f"{queries:10s} {vectors:20s} {n:5d} q  before {before['R@1']:5.1f} / {before[f'R@{k}']:5.1f}  after "
          f"{after['R@1']:5.1f} / {after[f'R@{k}']:5.1f}  change {after['R@1'] - before['R@1']:+5.1f} / "
          f"{after[f'R@{k}'] - before[f'R@{k}']:+5.1f}", flush=True)


if __name__ == "__main__":
    main()
