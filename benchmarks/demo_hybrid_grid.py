"""The hybrid scorer's weight w on a trained demo run, one row per w (issue 17, candidate b).

    python benchmarks/demo_hybrid_grid.py --run runs/demo [--candidates 10 50] [--levels prefix full] [--out benchmarks/out/grid.json]
        [--dense 0 10] [--dense-logprob teacher_forced beam_floor] [--weights 16 32] [--query-sets FILE ...]

For every w of the hybrid grid (HybridConfig.weights), every candidate count B and both identifier
levels in the log-prob (prefix = k..vM, hybrid.levels' default; full = with the counter u): the generative
top-B re-scored by log P(identifier prefix | q) + w * cos(v_q, v_item), exactly as hybrid search
does (ace/newitems/hybrid.py), on
  - the held-out test captions (R@1, MRR@10),
  - the run's held-out scorer queries (RUN/scorer_queries.json) with the fit's item vectors (the
    queries the model trained on only): what the pipeline's w fit sees (R@1, MRR),
  - each newcomer query set of the config's eval.query_sets (top-1 / top-5 relevant).
w = 0 is the generative ranking of the top-B. ``--dense D``: + the D items nearest the query vector that
the beams missed (hybrid.dense_candidates), their log-prob teacher-forced (``teacher_forced``, what hybrid
search does) or raised to the weakest beam candidate's (``beam_floor``, a what-if rule of this script only:
the beams cut them off, so the cosine decides among them and the weakest kept candidates). It answers why a w fitted by MRR on the scorer queries
can cost held-out R@1, and which w the newcomer sets would want; choosing w on the check set is not
the point (it stays the independent check).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.config import load_config  # noqa: E402
from ace.newitems.candidates import generative_candidates  # noqa: E402
from ace.newitems.hybrid import HybridConfig, ItemVectorSet, encode_texts, item_texts, mean_vectors, rerank  # noqa: E402
from ace.pipeline.query_sets import load_query_set, relevant_sets  # noqa: E402
from ace.pipeline.run_config import RunConfig  # noqa: E402
from ace.run_folder import RunPaths, load_run_corpus, read_pairs  # noqa: E402
from ace.serving.retriever import Retriever  # noqa: E402


def ranks_of(ranked: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """0-based rank of the first relevant row per query, -1 when none is among the candidates."""
    out = np.full(len(ranked), -1)
    for i, (row, rel) in enumerate(zip(ranked.tolist(), relevant)):
        out[i] = next((j for j, r in enumerate(row) if r in rel), -1)
    return out


def beam_floor(logprob: np.ndarray, beams: int) -> np.ndarray:
    """(Q, B + D) log-probs with the D dense candidates' raised to the weakest of the B beam candidates'."""
    gen = logprob[:, :beams]
    floor = np.where(np.isfinite(gen), gen, np.inf).min(1, keepdims=True)
    out = logprob.copy()
    out[:, beams:] = np.where(np.isfinite(out[:, beams:]) & np.isfinite(floor), np.maximum(out[:, beams:], floor), out[:, beams:])
    return out


def summary(pos: np.ndarray) -> dict:
    return {"R@1": 100 * float((pos == 0).mean()), "R@5": 100 * float(((pos >= 0) & (pos < 5)).mean()),
            "MRR": 100 * float(np.where(pos >= 0, 1.0 / (np.maximum(pos, 0) + 1), 0.0).mean())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--candidates", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--levels", nargs="+", default=["prefix", "full"], choices=["prefix", "full"],
                    help="identifier levels in the log-prob: prefix (k..vM, the default of hybrid.levels) or full (+ u)")
    ap.add_argument("--dense", type=int, nargs="+", default=[0], help="dense candidates D (0 = none)")
    ap.add_argument("--dense-logprob", nargs="+", default=["teacher_forced"], choices=["teacher_forced", "beam_floor"])
    ap.add_argument("--weights", type=float, nargs="+", default=None, help="w values (default: the hybrid grid)")
    ap.add_argument("--query-sets", nargs="+", default=None, help="newcomer sets (default: the config's eval.query_sets)")
    ap.add_argument("--out", default=None, help="JSON of every row (default: print only)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    paths = RunPaths(run)
    cfg = load_config(RunConfig, str(paths.config), [])
    hcfg = HybridConfig()
    retriever = Retriever.from_run(run, fallback=False)
    model, qtok, vocab, tok = retriever.model, retriever.query_tokenizer, retriever.vocab, retriever.id_tokenizer
    ids = list(tok.trie.item_ids)
    row_of = {iid: i for i, iid in enumerate(ids)}
    corpus = {it.item_id: it for it in load_run_corpus(run, RunPaths.CORPUS_TRAIN).items}
    held = read_pairs(paths.scorer_queries) if paths.scorer_queries.is_file() else []
    held_set = set(map(tuple, held))
    kept: dict = {}
    every: dict = {}
    for q, iid in read_pairs(paths.train_queries):
        every.setdefault(iid, []).append(q)
        if (q, iid) not in held_set:
            kept.setdefault(iid, []).append(q)
    cache: dict = {}

    def encode(texts):
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        for t, v in zip(new, encode_texts(model, qtok, new) if new else []):
            cache[t] = v
        return np.stack([cache[t] for t in texts])

    def vectors(by_item):
        vecs = mean_vectors([item_texts(corpus[i].description(), by_item.get(i, []), "doc_plus_queries") for i in ids],
                            encode, ids)
        return ItemVectorSet.build(ids, vecs, "float32")

    serve, fit = vectors(every), vectors(kept)
    test = read_pairs(paths.test_queries)
    sets = {"held-out captions": ([q for q, _ in test], [{row_of[t]} for _, t in test], serve)}
    if held:
        sets["scorer queries (fit)"] = ([q for q, _ in held], [{row_of[t]} for _, t in held], fit)
    items = retriever.corpus.items
    for path in args.query_sets or cfg.eval.query_sets:
        qs = load_query_set(path)
        rel = relevant_sets(qs, items, source=path)
        sets[Path(path).stem] = ([q.query for q in qs], [{row_of[i] for i in r if i in row_of} for r in rel], serve)
    result: dict = {"run": str(run), "rows": []}
    codes = np.asarray(tok.trie.codes)
    for levels, B, D in [(lv, b, d) for lv in args.levels for b in args.candidates for d in args.dense]:
        cand = {name: generative_candidates(model, qtok, retriever.trie(), vocab, qs, B, levels=levels, dense=(serve, codes, D))
                for name, (qs, _, _) in sets.items()}
        for rule in (args.dense_logprob if D else ["teacher_forced"]):
            for w in args.weights or hcfg.weights:
                row = {"levels": levels, "B": B, "D": D, "dense_logprob": rule, "w": w}
                for name, (qs, rel, vset) in sets.items():
                    rows, lp, qv = cand[name]
                    if rule == "beam_floor":
                        lp = beam_floor(lp, B)
                    ranked, _ = rerank(rows, lp, vset.cosine(qv, rows), w)
                    row[name] = summary(ranks_of(ranked, rel))
                result["rows"].append(row)
    names = list(sets)
    print("levels B   D  dense-lp       w       " + "  ".join(f"{n[:22]:>22}" for n in names) + "   (R@1 R@5 MRR each)")
    for r in result["rows"]:
        print(f"{r['levels']:<6} {r['B']:<3} {r['D']:<3} {r['dense_logprob']:<14} {r['w']:<7.3g} " + "  ".join(f"{r[n]['R@1']:6.1f} {r[n]['R@5']:6.1f} {r[n]['MRR']:6.1f}"
                                                      for n in names))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    retriever.close()
    return result


if __name__ == "__main__":
    main()
