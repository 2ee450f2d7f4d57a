"""Pipeline stage ``hybrid``: the trained items' vectors in the query encoder's text space and the
fused scorer's weight w, fitted on the training queries held out of training (RUN/hybrid/).
The scorer itself lives in ``ace/newitems/hybrid.py``."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ace.newitems.candidates import generative_candidates
from ace.newitems.hybrid import (FORMAT_VERSION, HybridConfig, HybridError, ItemVectorSet, encode_texts, fit_weight,
                                 item_texts, mean_vectors)
from ace.pipeline.query_pairs import check_origins, excluded
from ace.run_folder import RunPaths, load_run_corpus, read_pairs, read_query_origins, write_json_atomic
from ace.serving.retriever import Retriever


def training_queries(run_dir: str | Path, held) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Item id -> its training queries (RUN/train_queries.json), and -> those kept when the ``held``
    (query, item_id) pairs are left out together with the queries derived from them (lever 2): the texts
    of an item vector that no held-out query may be found through."""
    all_pairs = read_pairs(RunPaths(run_dir).train_queries)
    origins = read_query_origins(run_dir)
    held_set = set(map(tuple, held))
    n_base = check_origins(all_pairs, origins)
    out = excluded({k for k, p in enumerate(all_pairs[:n_base]) if p in held_set}, origins)
    by_item_all: dict[str, list[str]] = {}
    by_item_kept: dict[str, list[str]] = {}
    for k, (q, iid) in enumerate(all_pairs):
        by_item_all.setdefault(iid, []).append(q)
        if k not in out:
            by_item_kept.setdefault(iid, []).append(q)
    return by_item_all, by_item_kept


def item_vector_sets(retriever, run_dir: str | Path, cfg: HybridConfig, held, *, seed: int = 0,
                     ids: list[str] | None = None):
    """(fit set, serving set) of the trained items' vectors (``ItemVectorSet``, rows in ``ids`` order, default the
    trie's: a run without added items): the fit set
    from the texts the model trained on only (no ``held`` (query, item_id) pair is in it), the serving set
    from every training query."""
    run_dir = Path(run_dir)
    ids = list(retriever.id_tokenizer.trie.item_ids) if ids is None else list(ids)
    corpus = {it.item_id: it for it in load_run_corpus(run_dir, RunPaths.CORPUS_TRAIN).items}
    by_item_all, by_item_kept = training_queries(run_dir, held)

    def desc(iid):
        it = corpus.get(iid)
        return it.description() if it is not None else None

    cache: dict = {}

    def encode(texts):
        new = [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            for t, v in zip(new, encode_texts(retriever.model, retriever.query_tokenizer, new)):
                cache[t] = v
        return np.stack([cache[t] for t in texts])

    fit_vecs = mean_vectors([item_texts(desc(i), by_item_kept.get(i, []), cfg.item_vectors) for i in ids], encode, ids)
    serve_vecs = mean_vectors([item_texts(desc(i), by_item_all.get(i, []), cfg.item_vectors) for i in ids], encode, ids)
    return tuple(ItemVectorSet.build(ids, v, cfg.storage, pq_bytes=cfg.pq_bytes, seed=seed)
                 for v in (fit_vecs, serve_vecs))


def build_run_hybrid(run_dir: str | Path, cfg: HybridConfig, *, device: str = "cpu", seed: int = 0,
                     name: str = "hybrid") -> dict:
    """Stage ``hybrid``: item vectors of the trained items + w fitted on RUN/scorer_queries.json -> RUN/hybrid/.

    The fit uses item vectors built from the queries the model trained on only (the held-out queries
    must not be in them); the stored vectors then use every training query (the serving item vectors)."""
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    held = read_pairs(paths.scorer_queries) if paths.scorer_queries.is_file() else []
    if not held:
        raise HybridError(f"{run_dir}: no held-out scorer queries (RUN/scorer_queries.json is empty): set "
                          f"split.scorer_queries > 0 so the hybrid weight is fitted on queries the model did not "
                          f"train on (or hybrid.enabled=false)")
    retriever = Retriever.from_run(run_dir, device=device, fallback=False)
    model, qtok, vocab = retriever.model, retriever.query_tokenizer, retriever.vocab
    tok = retriever.id_tokenizer
    fit_set, serve_set = item_vector_sets(retriever, run_dir, cfg, held, seed=seed)

    queries, targets = [q for q, _ in held], fit_set.rows_of([iid for _, iid in held])
    rows, lp, qv = generative_candidates(model, qtok, retriever.trie(), vocab, queries, cfg.candidates,
                                         levels=cfg.levels,
                                         dense=(fit_set, np.asarray(tok.trie.codes), cfg.dense_candidates))
    fit = fit_weight(rows, lp, fit_set.cosine(qv, rows), targets, cfg.weights)
    folder, tmp = run_dir / name, run_dir / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    serve_set.save(tmp)
    info = {"format_version": FORMAT_VERSION, "weight": fit["weight"], "levels": cfg.levels, "storage": cfg.storage,
            "item_vectors": cfg.item_vectors, "dim": int(serve_set.dim), "candidates": cfg.candidates,
            "dense_candidates": cfg.dense_candidates, "added_levels": cfg.added_levels, "added_neighbour": cfg.added_neighbour,
            "added_boost": cfg.added_boost,
            "items": len(serve_set.ids), "bytes_per_item": serve_set.bytes_per_item(), "shared_bytes": serve_set.shared_bytes(),
            "fit": fit}
    write_json_atomic(tmp / "scorer.json", info)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    retriever.close()
    return {k: v for k, v in info.items() if k != "fit"} | {"fit": {k: v for k, v in fit.items() if k != "grid"}}
