"""The fine-tuning of ``train.py fold`` (ace/pipeline/fold.py): the run's current model on the new
items' training pairs + the replayed old pairs, anchored to a frozen copy of itself
(``PreviousModel``, ``distill_weight``) on the replayed ones; a frozen encoder stays frozen (the run's
``training.freeze_encoder``: only the decoder and identifier embeddings move); prototype heads
(``model.prototype_levels``) get tables rebuilt over the old items and the candidates."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ace.run_folder import RunPaths, load_run_embeddings


class FoldTrainingError(ValueError):
    """Fine-tuning inputs missing (e.g. a vector for the prototype tables)."""


def train_config(run_cfg, cfg):
    """The run's TrainConfig with the fold's steps, lr (default half the run's), batch, R-Drop, seed."""
    t = run_cfg.training
    return dataclasses.replace(
        t, max_steps=cfg.steps, warmup_steps=min(cfg.warmup_steps, cfg.steps),
        lr=cfg.lr if cfg.lr is not None else 0.5 * t.lr, batch_size=cfg.batch_size or t.batch_size,
        omega=cfg.omega if cfg.omega is not None else t.omega, checkpoint_every=cfg.checkpoint_every, eval_every=0,
        seed=cfg.seed, progress=cfg.progress, distill_weight=0.0)


def item_vectors(run: Path, item_ids: list[str], store) -> np.ndarray:
    """The vectors the identifiers of ``item_ids`` were built from: the run's (identifier vectors or
    embeddings) for trained items, the stored embedding for added / folded ones."""
    paths = RunPaths(run)
    ids, emb = load_run_embeddings(run)
    vectors = np.load(paths.identifier_vectors) if paths.identifier_vectors.is_file() else emb
    row = {iid: i for i, iid in enumerate(ids)}
    out = []
    for iid in item_ids:
        if iid in row:
            out.append(vectors[row[iid]])
            continue
        stored = store.get(iid) if store is not None and store.status(iid) is not None else None
        if stored is None or stored.embedding is None:
            raise FoldTrainingError(f"no vector for item {iid!r} to rebuild the prototype heads from")
        out.append(np.asarray(stored.embedding, dtype=np.float32))
    return np.stack(out)


def fine_tune(run: Path, run_cfg, cfg, device: str, fold_dir: Path, tok, split: dict, live_rows: list[int],
              store) -> dict:
    """Fine-tune RUN/model on split's train_new + replay pairs; the model lands in fold_dir/model
    (resumes from fold_dir/checkpoints). ``live_rows``: rows of ``tok`` (old live items + candidates)."""
    import torch

    from ace.model.modeling import AceModel, prefix_prototypes
    from ace.model.tokens import IdentifierVocab, QueryTokenizer
    from ace.training.distill import PreviousModel
    from ace.training.loop import train_retriever

    paths = RunPaths(run)
    torch.manual_seed(cfg.seed)
    model = AceModel.from_pretrained(str(paths.model)).to(device)
    previous = PreviousModel(model) if cfg.distill_weight > 0 and split["replay"] else None
    head = model.decoder.prototypes
    if head is not None:   # the candidates' prefixes enter the prototype tables (fixed buffers)
        vectors = item_vectors(run, [tok.item_ids[r] for r in live_rows], store)
        level0, level1 = prefix_prototypes(tok.codes[live_rows], vectors, model.config.level_sizes, head.levels)
        with torch.no_grad():
            head.level0.copy_(torch.from_numpy(level0))
            if level1 is not None:
                head.level1.copy_(torch.from_numpy(level1))
    pairs = list(split["train_new"]) + list(split["replay"])
    anchor = None
    if previous is not None:
        anchor = (previous, [False] * len(split["train_new"]) + [True] * len(split["replay"]), cfg.distill_weight)
    result = train_retriever(model, QueryTokenizer.load(paths.query_tokenizer), tok,
                             IdentifierVocab.load(paths.identifier_vocab), pairs, None, train_config(run_cfg, cfg),
                             fold_dir, resume=True, anchor=anchor)
    return {"steps": result.step, "seconds": result.seconds, "frozen_encoder": bool(run_cfg.training.freeze_encoder),
            "prototype_heads": head is not None}
