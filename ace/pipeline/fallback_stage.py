"""The pipeline's ``fallback`` stage: RUN/fallback (query tower, hash head, empty binary index, calibration).

It runs after ``train``: it needs the trained generative model (through ``Retriever``) to record
the generative path's recall on the held-out calibration queries.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ace.metrics import retrieval_metrics
from ace.newitems.calibration import Calibration, calibration_samples, fit_calibration
from ace.newitems.index import FallbackConfig, FallbackError, FallbackIndex
from ace.newitems.query_tower import TextTower, run_text_tower
from ace.run_folder import RunPaths, load_run_corpus, load_run_embeddings, read_encoder_config, read_pairs
from ace.serving.retriever import Retriever


def build_run_fallback(run_dir: str | Path, config: FallbackConfig, *, seed: int = 0, device: str = "cpu",
                       text_encoder: TextTower | None = None, progress: bool = False) -> dict:
    """The pipeline's ``fallback`` stage: train the query tower + hash head on the run's training pairs,
    fit the calibration on held-out training queries, save RUN/fallback (empty index) atomically.

    Calibration (scale "cosine"): ``calibration_queries`` training queries kept out of the query
    tower's training are answered by the fallback over all trained items put into a scratch index;
    one Platt mapping of the tower cosine is fitted on those (cosine, is_correct) samples and used
    for both sources, so merged search compares every candidate on the tower's cosine. The
    generative model's log-probabilities are not calibrated: it trained on these queries, and a fit
    on them over-trusts it on held-out queries (old-item R@10 through merged search fell from 41.6
    to 27.1 on MSCOCO 80/20; benchmarks/results/new_items.md). The generative path's recall on the
    same queries is still recorded. Returns a summary (also written to RUN/fallback/summary.json).
    """
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    pairs = read_pairs(paths.train_queries)  # (query, item_id)
    item_ids, emb = load_run_embeddings(run_dir)
    n_cal = min(config.calibration_queries, len(pairs) // 2)
    if n_cal < 2:
        raise FallbackError(f"{run_dir} has {len(pairs)} training queries: too few to hold out calibration queries")
    order = np.random.default_rng(seed).permutation(len(pairs))
    cal = [pairs[i] for i in order[:n_cal]]
    fit_pairs = [(pairs[i][1], pairs[i][0]) for i in order[n_cal:]]  # (item_id, query)
    modalities = {it.modality for it in load_run_corpus(run_dir).items}
    enc_cfg = read_encoder_config(run_dir)
    dual = run_text_tower(enc_cfg, modalities) if enc_cfg is not None else None
    fb = FallbackIndex.train(config=config, pairs=fit_pairs, item_ids=item_ids, item_embeddings=emb,
                             text_encoder=None if dual else text_encoder, dual_encoder=dual, progress=progress)

    queries, targets = [q for q, _ in cal], [t for _, t in cal]
    scratch = FallbackIndex(tower=fb.tower, head=fb.head, config=config.index)
    scratch.add(item_ids, emb)
    fb_res = scratch.search(queries, k=config.calibration_k)
    gen = Retriever.from_run(run_dir, device=device, fallback=False)
    gen_res = [[(h.item_id, h.score) for h in row] for row in gen.search_generative(queries, k=config.calibration_k)]
    gen.close()
    scores, ok = calibration_samples(fb_res, targets)
    if ok.all() or not ok.any():
        raise FallbackError(f"calibration: the fallback results of {n_cal} held-out queries are all "
                            f"{'correct' if ok.all() else 'wrong'}; cannot fit a score mapping "
                            f"(raise fallback.calibration_queries or check the query tower)")
    platt = fit_calibration(scores, ok)
    if platt.a <= 0:
        raise FallbackError(f"calibration: higher tower cosines are not more often correct on the held-out "
                            f"queries (slope {platt.a:.3g}); the merged ranking would be meaningless")
    calibration = Calibration(generative=platt, fallback=platt, scale="cosine")
    summary = {
        "tower": "dual" if dual else "projected", "bits": config.hash.bits, "index": config.index.kind,
        "tower_pairs": len(fit_pairs), "calibration_queries": n_cal, "calibration": calibration.to_dict(),
        "bytes_per_item": fb.bytes_per_item(),
        "held_out_recall": {"fallback_over_trained_items": retrieval_metrics([[i for i, _ in r] for r in fb_res], targets),
                            "generative": retrieval_metrics([[i for i, _ in r] for r in gen_res], targets)},
    }
    staging = paths.fallback.with_name(paths.fallback.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    fb.save(staging)
    (staging / RunPaths.CALIBRATION).write_text(json.dumps(calibration.to_dict(), indent=1))
    (staging / "summary.json").write_text(json.dumps(summary, indent=1))
    final = paths.fallback
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return summary
