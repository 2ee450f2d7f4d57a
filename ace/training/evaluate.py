"""Held-out evaluation of the generative model: constrained beam search over (query, item) pairs ->
Recall@1/5/10 and MRR@10 (ace.metrics). Used at the end of training, for periodic validation
inside the training loop, and by the synthetic task."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ace.metrics import retrieval_metrics
from ace.training.pairs import encode_pairs


@torch.no_grad()
def rank_items(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie, vocab, *,
               num_beams: int, top_k: int, batch_size: int, progress: bool = False) -> np.ndarray:
    """Constrained beam search over all queries -> item rows int64 (N, top_k), -1 padded."""
    from ace.model.decoding import search_batches

    was_training = model.training
    model.eval()
    try:
        rows, _, _ = search_batches(model, input_ids, attention_mask, trie, vocab, num_beams=num_beams, top_k=top_k,
                                    batch_size=batch_size, progress=progress, desc="eval")
    finally:
        model.train(was_training)
    return rows


def metrics_from_rows(ranked_rows: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    rankings = [[int(r) for r in row if r >= 0] for row in ranked_rows]
    return retrieval_metrics(rankings, [int(t) for t in targets])


def query_length(model, query_tokenizer, requested: int | None) -> int:
    """Token budget per query: ``requested``, else the model's config.max_query_length, else the tokenizer's."""
    model_max = getattr(getattr(model, "config", None), "max_query_length", None)
    if requested is None:
        return int(model_max or query_tokenizer.max_length)
    if model_max is not None and requested > model_max:
        raise ValueError(f"max_query_length={requested} exceeds the model's max_query_length={model_max}")
    return int(requested)


def evaluate_retriever(model, query_tokenizer, id_tokenizer, vocab, pairs: Sequence[tuple[str, Any]], *,
                       num_beams: int = 10, top_k: int = 10, batch_size: int = 100,
                       max_query_length: int | None = None, progress: bool = False) -> dict[str, float]:
    """Recall@1/5/10 and MRR@10 (percent) of constrained beam search on (query, item) pairs."""
    if top_k > num_beams:
        raise ValueError(f"top_k ({top_k}) cannot exceed num_beams ({num_beams})")
    data = encode_pairs(pairs, query_tokenizer, id_tokenizer, vocab,
                        max_query_length=query_length(model, query_tokenizer, max_query_length),
                        what="evaluation pairs")
    ranked = rank_items(model, data.input_ids, data.attention_mask, id_tokenizer.trie.flat(), vocab,
                        num_beams=num_beams, top_k=top_k, batch_size=batch_size, progress=progress)
    return metrics_from_rows(ranked, data.rows.numpy())
