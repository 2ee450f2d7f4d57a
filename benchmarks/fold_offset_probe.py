"""What a swapped-in fold does to held-out test recall at other log-prob offsets for the folded items (issue 16).

    python benchmarks/fold_offset_probe.py RUN_DIR [--fold N] [--offsets 4 2 1 0 -1 -2 -4 -8]

A diagnostic, never a fit: the gate chooses its offset on validation queries; this shows, on the test
queries the fold's own report uses (``Fold._held_out``: the seeded sample of old items' test queries, and
the folded items' test queries), what merged search (hybrid mode, as served) would give with each offset.
The run must be just after fold N swapped in (the gate off, or passed) with every added item folded (none
left in the fallback). Each query is searched once by the gate's hybrid scoring (``fold_measure.hybrid_scored``,
which equals the Retriever's hybrid search) with every candidate kept (beam + dense candidates); the offsets
then only re-rank those candidates (an offset does not change the beam search), so one search serves every
offset. The "before" figures are the fold's report (RUN/fold/N/before.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ace.model.modeling import AceModel  # noqa: E402
from ace.newitems.hybrid import read_offsets  # noqa: E402
from ace.pipeline import fold_gate  # noqa: E402
from ace.pipeline.fold import Fold, FoldError, swapped_fold  # noqa: E402
from ace.pipeline.fold_config import FoldConfig  # noqa: E402
from ace.pipeline.fold_measure import GateView, gate_scorer, hybrid_scored  # noqa: E402
from ace.run_folder import RunPaths  # noqa: E402
from ace.serving.store import open_run_store  # noqa: E402
from identifiers import SemanticIdTokenizer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--fold", type=int, default=None, help="the fold (default: the latest)")
    ap.add_argument("--offsets", type=float, nargs="+", default=[4, 2, 1, 0, -1, -2, -4, -8])
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON of the table")
    args = ap.parse_args(argv)
    run = Path(args.run)
    paths = RunPaths(run)
    try:
        fold_dir, state, plan, cfg = swapped_fold(run, args.fold)
    except FoldError as exc:
        sys.exit(str(exc))
    folded = set(state["items"])
    fold = Fold(run, cfg)
    old, _ = fold._held_out(lambda iid: True, set(plan["items"]))
    new = [tuple(p) for p in json.loads((fold_dir / "test_pairs.json").read_text()) if p[1] in folded]
    served = read_offsets(paths.folded_offsets)
    before = json.loads((fold_dir / "before.json").read_text())
    store = open_run_store(run)
    try:
        if store.list_active(source="added"):
            sys.exit(f"{run}: added items are still in the fallback; this probe ranks the generative path only")
        scorer = gate_scorer(run, FoldConfig())
        if scorer is None:
            sys.exit(f"{run} has no hybrid scorer (RUN/hybrid)")
        view = GateView(run, scorer, {"val_old": [], "val_new": []},
                        lambda ids: [store.get(i).to_corpus_item() for i in ids])
        tok = SemanticIdTokenizer.load(paths.identifiers, device="cpu")
        model = AceModel.from_pretrained(str(paths.model)).eval()
        probe = FoldConfig(num_beams=args.beams, top_k=10, progress=False)
        rows = list(range(len(tok.item_ids)))
        old_scored, new_scored = (hybrid_scored(run, probe, model, tok, rows, pairs, view, offsets=served)
                                  for pairs in (old, new))
    finally:
        store.close()
    base = {served.get(i, 0.0) for i in folded}     # one fold stages one offset for all its items
    if len(base) != 1:
        sys.exit(f"{fold_dir}: the folded items are served with several offsets {sorted(base)}; expected one")
    base = base.pop()
    print(f"{fold_dir}: {len(folded)} folded items; served offset {base:+g}; "
          f"{len(old)} old-item and {len(new)} folded-item test queries; beam {args.beams}")
    print(f"before the fold: old items {before['old_merged']['R@1']:.1f} / {before['old_merged']['R@10']:.1f}, "
          f"these items {before['new_merged']['R@1']:.1f} / {before['new_merged']['R@10']:.1f} (merged search, R@1 / R@10)")
    rows = []
    for off in args.offsets:
        o, n = (fold_gate.metrics(fold_gate.shifted_rankings(scored, folded, off - base, 10), pairs)
                for scored, pairs in ((old_scored, old), (new_scored, new)))
        rows.append({"offset": off, "old": o, "folded": n})
        print(f"offset {off:+g}: old items {o['R@1']:.1f} / {o['R@10']:.1f}   folded items {n['R@1']:.1f} / {n['R@10']:.1f}",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "fold": fold_dir.name, "before": {
            k: before[k] for k in ("old_merged", "new_merged")}, "served_offset": base,
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
