"""Why the fold gate's candidate figures read higher on validation than on held-out test (issue 16): the number
of texts in the candidates' item vectors.

    python benchmarks/fold_texts_probe.py RUN_DIR [--fold N] [--out probe.json]

A diagnostic on a run just after fold N swapped in. A validation query is one of its item's training texts, so
the gate must keep it out of the item's vector: on validation a candidate's vector averages one text fewer than
it does when served. This re-runs the gate's hybrid scoring (``fold_measure.hybrid_scored``, as merged search
serves) before the fold (RUN/model.prev, every candidate in the fallback) and after it (RUN/model, the folded
items on the generative path with their served offset, the rest in the fallback) on

- the folded items' held-out test queries (fold_dir/test_pairs.json), with the candidates' vectors built from
  all their texts (as served: the fold report's figures), without their validation query (as the gate sees
  them), and without one more text;
- the candidates' validation queries (fold_dir/split.json), without their validation query (the gate's figures,
  here at the served offset instead of the cross-fitted halves) and without one more text.

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
from ace.pipeline.fold_config import FoldConfig  # noqa: E402
from ace.pipeline.fold_measure import GateView, gate_scorer, hybrid_scored  # noqa: E402
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
    ap.add_argument("--out", default=None, help="JSON of the table")
    args = ap.parse_args(argv)
    run = Path(args.run)
    paths = RunPaths(run)
    fold_dir = paths.fold / str(args.fold or max(int(p.name) for p in paths.fold.iterdir() if p.name.isdigit()))
    state = json.loads((fold_dir / "state.json").read_text())
    if state.get("phase") != "done" or not state.get("items"):
        sys.exit(f"{fold_dir}: not a finished fold that swapped items in (phase {state.get('phase')})")
    prev_model, prev_ids = run / f"{RunPaths.MODEL}.prev", run / f"{RunPaths.IDENTIFIERS}.prev"
    if not (prev_model.is_dir() and prev_ids.is_dir()):
        sys.exit(f"{run}: the model before fold {fold_dir.name} ({prev_model}, {prev_ids}) is gone")
    plan = json.loads((fold_dir / "plan.json").read_text())
    split = {k: [tuple(p) for p in v] for k, v in json.loads((fold_dir / "split.json").read_text()).items()
             if k in ("val_new", "val_old")}
    cfg = FoldConfig(**{k: v for k, v in plan["config"].items() if k in FoldConfig.__dataclass_fields__})
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
        extra = one_more_text(items_of(candidates), {iid: {q} for q, iid in split["val_new"]}, cfg.seed)
        views = {"all texts": GateView(run, scorer, {"val_old": [], "val_new": []}, items_of),
                 "no val query": GateView(run, scorer, {"val_old": [], "val_new": split["val_new"]}, items_of),
                 "one more out": GateView(run, scorer, {"val_old": [], "val_new": split["val_new"] + extra}, items_of),
                 "gate (val)": GateView(run, scorer, split, items_of),
                 "gate, one more out": GateView(run, scorer, {**split, "val_new": split["val_new"] + extra}, items_of)}
        before_model = AceModel.from_pretrained(str(prev_model)).eval()
        after_model = AceModel.from_pretrained(str(paths.model)).eval()
        before_off, after_off = read_offsets(prev_model / RunPaths.FOLDED_OFFSETS), read_offsets(paths.folded_offsets)
        plan_rows = [("test", test, ("all texts", "no val query", "one more out")),
                     ("validation", split["val_new"], ("gate (val)", "gate, one more out"))]
        out = []
        for name, pairs, keys in plan_rows:
            for key in keys if pairs else ():
                b = hybrid_scored(run, cfg, before_model, tok, old_rows, pairs, views[key], fallback=candidates,
                                  offsets=before_off)
                a = hybrid_scored(run, cfg, after_model, tok, old_rows + [row[i] for i in sorted(folded)], pairs,
                                  views[key], fallback=stayed, offsets=after_off)
                mb, ma = (fold_gate.metrics([[i for i, _ in r[:cfg.top_k]] for r in s], pairs) for s in (b, a))
                out.append({"queries": name, "vectors": key, "n": len(pairs), "before": mb, "after": ma})
                print(f"{name:10s} {key:20s} {len(pairs):5d} q  before {mb['R@1']:5.1f} / {mb['R@10']:5.1f}  "
                      f"after {ma['R@1']:5.1f} / {ma['R@10']:5.1f}  change {ma['R@1'] - mb['R@1']:+5.1f} / "
                      f"{ma['R@10'] - mb['R@10']:+5.1f}", flush=True)
    finally:
        store.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "fold": fold_dir.name, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
