"""The hybrid operating point in ``python -m ace.bench quality``: methods ``ace_hybrid`` (float32 item
vectors), ``ace_hybrid_int8`` and ``ace_hybrid_pq`` re-score the ``ace`` model of the same seed, and
``ace_qid_proto_hybrid[_int8]`` the ``ace_qid_proto`` model (levers 1 + 3; no extra training), ``ace_qid_proto_para_hybrid``
the ``ace_qid_proto_para`` model (+ lever 2's paraphrases): its top-B by log-prob + w * cosine (ace/newitems/hybrid.py), w fitted on
the ``split.scorer_queries`` training queries held out of training (ace/pipeline/hybrid_stage.py)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

HYBRID_VARIANTS = {"ace_hybrid": "float32", "ace_hybrid_int8": "int8", "ace_hybrid_pq": "pq",  # -> item-vector storage
                   "ace_qid_proto_hybrid": "float32", "ace_qid_proto_hybrid_int8": "int8",
                   "ace_qid_proto_para_hybrid": "float32", "ace_qid_proto_hybrid_dense": "float32"}
DENSE_CANDIDATES = {"ace_qid_proto_hybrid_dense": 20}  # + the 20 items nearest the query vector (hybrid.dense_candidates)
HYBRID_LABELS = {"ace_hybrid": "ACE hybrid (float32 item vectors)", "ace_hybrid_int8": "ACE hybrid (int8 item vectors)",
                 "ace_hybrid_pq": "ACE hybrid (PQ item vectors)",
                 "ace_qid_proto_hybrid": "ACE levers 1 + 3, hybrid (float32 item vectors)",
                 "ace_qid_proto_hybrid_int8": "ACE levers 1 + 3, hybrid (int8 item vectors)",
                 "ace_qid_proto_para_hybrid": "ACE levers 1 + 3 + paraphrases (lever 2), hybrid (float32 item vectors)",
                 "ace_qid_proto_hybrid_dense": "ACE levers 1 + 3, hybrid + 20 dense candidates (float32, exact scan)"}
_CANDIDATES: dict = {}  # (run dir, beams, levels, queries) -> (generative_candidates(...), seconds)


def decode_hybrid(run_dir: Path, cfg, storage: str, queries: list[str], targets: list[str], beams: int, *,
                  device: str, top_k: int = 10, dense: int = 0) -> tuple[list[list[str]], dict, dict]:
    """(rankings, seconds, extra) of the hybrid scorer over the run's `ace` model at ``beams`` candidates
    (+ ``dense`` nearest items by the query vector, ``hybrid.dense_candidates``).

    The scorer (item vectors in ``storage`` + w fitted on RUN/scorer_queries.json) is built once per
    (storage, beams, dense) into RUN/hybrid_<storage>_b<beams>[_d<dense>]/ by
    ``ace.pipeline.hybrid_stage.build_run_hybrid``."""
    from ace.newitems.candidates import generative_candidates, with_dense_candidates
    from ace.newitems.hybrid import HybridScorer, rerank
    from ace.pipeline.hybrid_stage import build_run_hybrid
    from ace.serving.retriever import Retriever

    dev = None if device == "auto" else device
    hcfg = dataclasses.replace(cfg.hybrid, storage=storage, candidates=beams, dense_candidates=dense)
    name = f"hybrid_{storage}_b{beams}" + (f"_d{dense}" if dense else "")
    t = time.perf_counter()
    key = json.dumps(dataclasses.asdict(hcfg), sort_keys=True)
    info_file = run_dir / name / "scorer.json"
    if not info_file.is_file() or json.loads(info_file.read_text()).get("config") != key:
        build_run_hybrid(run_dir, hcfg, device=dev or "cpu", seed=cfg.seed, name=name)
        info = json.loads(info_file.read_text())
        info["config"] = key
        info_file.write_text(json.dumps(info, indent=2))
    fit_s = time.perf_counter() - t
    scorer = HybridScorer.load(run_dir, name)
    retriever = Retriever.from_run(run_dir, device=dev, fallback=False)
    ids = retriever.id_tokenizer.trie.item_ids
    # the generative top-B of the test queries does not depend on the item-vector storage: one beam
    # pass per (run, beams, levels), re-scored by each storage's scorer
    ckey = (str(run_dir.resolve()), beams, scorer.levels, len(queries))
    t0 = time.perf_counter()
    if ckey not in _CANDIDATES:
        _CANDIDATES[ckey] = (generative_candidates(retriever.model, retriever.query_tokenizer, retriever.trie(),
                                                   retriever.vocab, queries, beams, levels=scorer.levels),
                             time.perf_counter() - t0)
    if dense:  # + the nearest items the beams missed, from the stored vectors: cached per storage
        base, base_s = _CANDIDATES[ckey]
        ckey += (dense, storage)
        if ckey not in _CANDIDATES:
            if list(ids) != list(scorer.vectors.ids):
                raise RuntimeError(f"{run_dir / name}: the item vectors are not in the identifier table's order")
            t0 = time.perf_counter()
            _CANDIDATES[ckey] = (with_dense_candidates(
                retriever.model, retriever.query_tokenizer, retriever.trie(), retriever.vocab, queries, *base,
                dense=(scorer.vectors, np.asarray(retriever.id_tokenizer.trie.codes), dense), levels=scorer.levels),
                base_s + time.perf_counter() - t0)
    (rows, lp, qv), pass_s = _CANDIDATES[ckey]
    t1 = time.perf_counter()
    vec_rows = scorer.vectors.rows_of([ids[r] if r >= 0 else None for r in rows.ravel().tolist()]).reshape(rows.shape)
    ranked, _ = rerank(rows, lp, scorer.vectors.cosine(qv, vec_rows), scorer.weight)
    secs = pass_s + time.perf_counter() - t1
    retriever.close()
    rankings = [[ids[r] for r in row[:top_k] if r >= 0] for row in ranked.tolist()]
    gold = [t in {ids[r] for r in row if r >= 0} for row, t in zip(rows.tolist(), targets)]   # + dense ones
    fit = scorer.info["fit"]
    extra = {"weight": scorer.weight, "bytes_per_item": scorer.vectors.bytes_per_item(),
             "shared_bytes": scorer.vectors.shared_bytes(), "candidate_recall": 100 * float(np.mean(gold)),
             "item_vectors": scorer.info["item_vectors"], "levels": scorer.levels,
             "val_queries": fit["queries"], "val_R@1": fit["val_at_weight"]["R@1"],
             "val_R@1_generative": (fit["val_generative_only"] or {}).get("R@1")}
    return rankings, {"fit": fit_s, "search": secs}, extra


def hybrid_notes(rows: list[dict], labels: dict) -> list[str]:
    """Markdown lines under the quality table: each hybrid row's w, validation figures, bytes per item."""
    hyb = [r for r in rows if r["method"] in HYBRID_VARIANTS]
    lines: list[str] = []
    if hyb:
        lines += ["", "Hybrid rows (per seed): w fitted on held-out training queries; item vectors; bytes per item; "
                  "gold among the re-scored top-B candidates (test queries):", ""]
        lines += [f"- {labels[r['method']]}, beams {r['beams']}, seed {r['seed']}: w = {r['weight']:g} "
                  f"({r['val_queries']} val queries: R@1 {r['val_R@1']:.1f} vs generative alone "
                  f"{r['val_R@1_generative']:.1f}); {r['item_vectors']} vectors, {r['bytes_per_item']:.0f} B/item"
                  + (f" + {r['shared_bytes']} B shared codebook" if r["shared_bytes"] else "")
                  + f"; gold in top-{r['beams']}: {r['candidate_recall']:.1f}%" for r in hyb]
    return lines
