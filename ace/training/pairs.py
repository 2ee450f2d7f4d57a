"""Training data: (query, item) pairs -> tokenised query tensors + identifier targets.

A *pair* is ``(query text, item)`` where item is a row index into ``id_tokenizer.codes`` or an
item id string from ``id_tokenizer.item_ids``. Queries go through the query tokenizer, the item's
identifier ``(k, v1..vM, u)`` through ``IdentifierVocab.encode`` into labels ``[t_1 .. t_L]``;
the decoder input is the labels shifted right with BOS. Used by the training loop and the
prefix-prototype teacher (ace/training/distill.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


class TrainingDataError(ValueError):
    """Training or validation pairs are unusable (empty, unknown item, index out of range, ...)."""


@dataclass
class EncodedPairs:
    """Tokenised pairs: query tensors, identifier labels / decoder inputs, and target rows."""

    input_ids: torch.Tensor  # (N, S) int64
    attention_mask: torch.Tensor  # (N, S) int64
    decoder_input_ids: torch.Tensor  # (N, L) int64
    labels: torch.Tensor  # (N, L) int64
    rows: torch.Tensor  # (N,) int64, row into id_tokenizer.codes
    encoder_states: torch.Tensor | None = None  # (N, S_enc, W, d) outputs of a frozen encoder (cache_encoder_states)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[index]                                  # (B, S)
        width = max(1, int(mask.sum(1).max()))                             # longest query in this batch
        out = {
            "input_ids": self.input_ids[index, :width],                    # (B, width): no all-pad columns
            "attention_mask": mask[:, :width],
            "decoder_input_ids": self.decoder_input_ids[index],
            "labels": self.labels[index],
        }
        if self.encoder_states is not None:
            out["encoder_layer_states"] = self.encoder_states[index, :, :width]  # (B, S_enc, width, d)
        return out


def resolve_rows(items: Sequence[Any], id_tokenizer, *, what: str = "pairs") -> np.ndarray:
    """Item ids (str) or row indices (int) -> int64 row indices, with errors naming the bad entry."""
    n_items = int(np.asarray(id_tokenizer.codes).shape[0])
    id_to_row = None
    rows = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < n_items:
                raise TrainingDataError(f"{what}[{i}]: item index {int(item)} is out of range for {n_items} items")
            rows[i] = int(item)
        elif isinstance(item, str):
            if id_to_row is None:
                id_to_row = {item_id: r for r, item_id in enumerate(id_tokenizer.item_ids)}
            if item not in id_to_row:
                raise TrainingDataError(f"{what}[{i}]: unknown item id {item!r} (not in the identifier tokenizer)")
            rows[i] = id_to_row[item]
        else:
            raise TrainingDataError(f"{what}[{i}]: item must be a row index (int) or an item id (str), got {item!r}")
    return rows


def tokenize_queries(query_tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query texts -> (input_ids, attention_mask), both int64 (N, S)."""
    enc = query_tokenizer(list(texts), max_length=max_length)  # QueryBatch(input_ids, attention_mask)
    return enc.input_ids.long(), enc.attention_mask.long()


def identifier_targets(codes: np.ndarray, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Identifier codes (N, L) -> (decoder_input_ids [BOS, t_1..t_{L-1}], labels [t_1..t_L])."""
    labels = torch.as_tensor(vocab.encode(np.asarray(codes, dtype=np.int64)), dtype=torch.long)  # (N, L)
    return vocab.decoder_inputs(labels), labels  # (N, L) each


def encode_pairs(pairs: Sequence[tuple[str, Any]], query_tokenizer, id_tokenizer, vocab, *,
                 max_query_length: int, what: str = "pairs") -> EncodedPairs:
    """(query, item) pairs -> EncodedPairs, validating every query and item."""
    if pairs is None or len(pairs) == 0:
        raise TrainingDataError(f"{what} is empty: need at least one (query, item) pair")
    texts, items = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TrainingDataError(f"{what}[{i}] must be a (query, item) pair, got {pair!r}")
        query, item = pair
        if not isinstance(query, str) or not query.strip():
            raise TrainingDataError(f"{what}[{i}]: query must be a non-empty string, got {query!r}")
        texts.append(query)
        items.append(item)
    rows = resolve_rows(items, id_tokenizer, what=what)
    input_ids, attention_mask = tokenize_queries(query_tokenizer, texts, max_query_length)
    decoder_input_ids, labels = identifier_targets(np.asarray(id_tokenizer.codes)[rows], vocab)
    return EncodedPairs(input_ids, attention_mask, decoder_input_ids, labels, torch.as_tensor(rows))
