"""Where a fold's old-item loss comes from (issue 16): forgetting vs the folded items' competition.

    python benchmarks/fold_competition_probe.py RUN_DIR [--queries 600] [--fold 1]

On a hybrid run just after a swapped-in fold (RUN/model.prev and RUN/identifiers.prev are the model and
identifiers before it), ranks a seeded sample of the old items' held-out test queries by the hybrid-scored
generative path (no fallback; ``fold_measure.hybrid_rows``, beam 10, top 10) three ways: the previous model
over the old items; the folded model over the old items only (the difference is forgetting); the folded model
over the old and the folded items (the further difference is the folded items taking beam slots).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ace.model.modeling import AceModel  # noqa: E402
from ace.pipeline import fold_gate  # noqa: E402
from ace.pipeline.fold_config import FoldConfig  # noqa: E402
from ace.pipeline.fold_measure import GateView, gate_scorer, hybrid_rows  # noqa: E402
from ace.run_folder import read_pairs  # noqa: E402
from ace.serving.store import open_run_store  # noqa: E402
from identifiers import SemanticIdTokenizer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--fold", type=int, default=1)
    args = ap.parse_args(argv)
    run = Path(args.run)
    cfg = FoldConfig(num_beams=10, top_k=10, progress=False)
    scorer = gate_scorer(run, cfg)
    if scorer is None:
        sys.exit(f"{run} has no hybrid scorer (RUN/hybrid)")
    candidates = set(json.loads((run / "fold" / str(args.fold) / "plan.json").read_text())["items"])
    old = [p for p in read_pairs(run / "test_queries.json") if p[1] not in candidates]
    old = [old[i] for i in sorted(np.random.default_rng(0).permutation(len(old))[:args.queries])]
    store = open_run_store(run)
    view = GateView(run, scorer, {"val_old": [], "val_new": []}, lambda ids: [store.get(i).to_corpus_item() for i in ids])
    prev_tok = SemanticIdTokenizer.load(run / "identifiers.prev", device="cpu")
    tok = SemanticIdTokenizer.load(run / "identifiers", device="cpu")
    prev, now = (AceModel.from_pretrained(str(run / name)).eval() for name in ("model.prev", "model"))
    old_ids = set(prev_tok.item_ids)
    cases = [("previous model, old items", prev, prev_tok, list(range(len(prev_tok.item_ids)))),
             ("folded model, old items", now, tok, [r for r, i in enumerate(tok.item_ids) if i in old_ids]),
             ("folded model, old + folded items", now, tok, list(range(len(tok.item_ids))))]
    for name, model, t, rows in cases:
        m = fold_gate.metrics(hybrid_rows(run, cfg, model, t, rows, old, view), old)
        print(f"{name}: R@1 {m['R@1']:.1f}  R@10 {m['R@10']:.1f}  ({m['queries']} queries, {len(rows)} items in the trie)",
              flush=True)
    store.close()


if __name__ == "__main__":
    main()
