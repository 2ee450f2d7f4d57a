"""Prefix-prototype teacher: soft targets for every identifier level from a dual-tower view.

The paper trains the decoder on hard labels only: for a training query, the one gold token at
each level. With a few queries per item that teaches the decoder which branch is right, but not
how close the other branches are, and beam search later ranks those other branches. This module
adds an optional distillation term (``TrainConfig.distill_weight``, 0 = the paper's loss):

- every item gets a prototype ``p_i`` = unit(sum of the teacher-encoder vectors of its training
  queries) (a text encoder, default all-MiniLM-L6-v2, so it works for any item modality);
- every identifier prefix (node of the trie) gets the unit mean of its items' prototypes;
- for a training query ``q`` of item ``i`` and level ``l``, the teacher distribution over the
  children of i's prefix at level l is ``softmax(tau * q . node_vec(child))``, where the child on
  i's own path uses i's prototype *without q* (leave-one-out), so the teacher scores the gold
  branch as it would score an unseen query of i.

At inference nothing changes: the decoder alone generates identifiers, no item vector is used.
A hierarchical search with these node vectors alone comes within 3 R@1 of exact dual-tower search
on the Flickr30K caption proxy (BENCHMARKS.md), so they are a sound teacher for the prefixes.

    teacher = PrefixTeacher.from_queries(query_vecs, rows, codes, vocab, tau=20.0)
    idx, probs = teacher.targets(query_vecs[batch], rows[batch], leave_one_out=True)
    kd = distillation_loss(logits, idx, probs)          # KL(teacher || student over siblings)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ace.arrays import unit_rows
from ace.training.pairs import resolve_rows


class TeacherError(ValueError):
    """Teacher inputs do not fit together (shapes, NaN, rows out of range, items without queries)."""


@dataclass
class _Level:
    """Trie nodes at one depth: prototype sums, CSR children lists per parent, each item's node."""
    node_sum: torch.Tensor    # (n, D) float32: sum of member items' prototypes
    node_code: torch.Tensor   # (n,) int64: the level's code on the edge into the node
    child_start: torch.Tensor  # (n_parents,) int64: first child (in node order) of each parent
    child_count: torch.Tensor  # (n_parents,) int64
    item_node: torch.Tensor   # (N,) int64: node of every item at this depth
    item_parent: torch.Tensor  # (N,) int64: parent node (previous depth; 0 = root) of every item


class PrefixTeacher:
    """Soft targets over sibling identifier tokens from prefix-mean prototypes (see module doc)."""

    def __init__(self, *, prototypes: np.ndarray, query_sums: np.ndarray, codes: np.ndarray,
                 offsets: list[int], tau: float):
        if tau <= 0:
            raise TeacherError(f"tau must be > 0, got {tau}")
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != prototypes.shape[0]:
            raise TeacherError(f"codes {codes.shape} do not match {prototypes.shape[0]} item prototypes")
        self.tau, self.offsets = float(tau), list(offsets)
        self.prototypes = torch.as_tensor(prototypes, dtype=torch.float32)   # (N, D) unit
        self.query_sums = torch.as_tensor(query_sums, dtype=torch.float32)   # (N, D)
        N, L = codes.shape
        self.levels: list[_Level] = []
        parent = np.zeros(N, dtype=np.int64)                                 # root
        for level in range(L):
            _, node = np.unique(codes[:, :level + 1], axis=0, return_inverse=True)
            node = node.reshape(-1).astype(np.int64)                         # (N,) node at this depth
            n = int(node.max()) + 1
            node_sum = np.zeros((n, prototypes.shape[1]), dtype=np.float64)
            np.add.at(node_sum, node, prototypes)
            node_code = np.zeros(n, dtype=np.int64)
            node_code[node] = codes[:, level]
            node_parent = np.zeros(n, dtype=np.int64)
            node_parent[node] = parent
            # np.unique sorts prefixes lexicographically, so the children of a parent are contiguous
            n_par = int(parent.max()) + 1
            count = np.bincount(node_parent, minlength=n_par).astype(np.int64)
            start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
            self.levels.append(_Level(torch.as_tensor(node_sum, dtype=torch.float32), torch.as_tensor(node_code),
                                      torch.as_tensor(start), torch.as_tensor(count),
                                      torch.as_tensor(node), torch.as_tensor(parent)))
            parent = node
        self.max_children = [int(lv.child_count.max()) for lv in self.levels]

    @classmethod
    def from_queries(cls, query_vectors, rows, codes, vocab, *, tau: float = 20.0) -> "PrefixTeacher":
        """Prototypes from (P, D) teacher vectors of the training queries and their item rows (P,)."""
        q = np.asarray(query_vectors, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        codes = np.asarray(codes, dtype=np.int64)
        if q.ndim != 2 or q.shape[0] != rows.shape[0]:
            raise TeacherError(f"query vectors {q.shape} do not match {rows.shape[0]} query rows")
        if not np.isfinite(q).all():
            raise TeacherError("teacher query vectors contain NaN or inf")
        N = codes.shape[0]
        if rows.size and (rows.min() < 0 or rows.max() >= N):
            raise TeacherError(f"query rows must be in [0, {N}), got [{rows.min()}, {rows.max()}]")
        sums = np.zeros((N, q.shape[1]), dtype=np.float64)
        np.add.at(sums, rows, unit_rows(q))
        missing = np.flatnonzero(np.linalg.norm(sums, axis=1) == 0)
        if missing.size:
            raise TeacherError(f"{missing.size} item(s) have no training query (first rows {missing[:5].tolist()}): "
                               "every item needs at least one query for the teacher")
        return cls(prototypes=unit_rows(sums), query_sums=sums.astype(np.float32), codes=codes,
                   offsets=list(vocab.offsets), tau=tau)

    def targets(self, query_vectors: torch.Tensor, rows: torch.Tensor, *, leave_one_out: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) unit query vectors + (B,) item rows -> token ids (B, L, C) (-1 = padding) and teacher
        probabilities (B, L, C) over the children of each item's prefix; C = max children of any level."""
        q = torch.as_tensor(query_vectors, dtype=torch.float32)
        rows = torch.as_tensor(rows, dtype=torch.long)
        B = q.shape[0]
        C = max(self.max_children)
        protos = self.prototypes[rows]                                             # (B, D)
        if leave_one_out:   # prototype of the gold item without this query (kept when it is its only one)
            rest = self.query_sums[rows] - F.normalize(q, dim=-1)
            alone = rest.norm(dim=-1, keepdim=True) < 1e-6
            loo = torch.where(alone, protos, F.normalize(rest, dim=-1))
        else:
            loo = protos
        ids = torch.full((B, len(self.levels), C), -1, dtype=torch.long)
        probs = torch.zeros(B, len(self.levels), C)
        ar = torch.arange(C)
        for level, lv in enumerate(self.levels):
            parent = lv.item_parent[rows]                                          # (B,)
            count = lv.child_count[parent]                                         # (B,)
            valid = ar[None, :] < count[:, None]                                   # (B, C)
            child = (lv.child_start[parent][:, None] + ar[None, :]).clamp_max(lv.node_sum.shape[0] - 1)
            sums = lv.node_sum[child]                                              # (B, C, D)
            gold = child == lv.item_node[rows][:, None]                            # (B, C)
            sums = sums + gold[..., None].float() * (loo - protos)[:, None, :]     # leave-one-out on the gold branch
            logits = self.tau * torch.einsum("bd,bcd->bc", q, F.normalize(sums, dim=-1))
            probs[:, level] = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
            ids[:, level] = torch.where(valid, lv.node_code[child] + self.offsets[level], -1)
        return ids, probs


def distillation_loss(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over each position's sibling tokens, averaged over positions.

    logits (B, L, V) of the decoder; ids (B, L, C) sibling token ids (-1 = padding); probs (B, L, C)."""
    if logits.shape[:2] != ids.shape[:2] or ids.shape != probs.shape:
        raise TeacherError(f"distillation shapes do not fit: logits {tuple(logits.shape)}, ids {tuple(ids.shape)}, "
                           f"probs {tuple(probs.shape)}")
    valid = ids >= 0
    student = logits.float().gather(-1, ids.clamp_min(0)).masked_fill(~valid, float("-inf"))  # (B, L, C)
    log_s = torch.log_softmax(student, dim=-1)
    p = probs.to(log_s.dtype)
    kl = torch.where(valid & (p > 0), p * (torch.log(p.clamp_min(1e-12)) - log_s), torch.zeros_like(p))
    return kl.sum(-1).mean()


def teacher_for_pairs(pairs, id_tokenizer, vocab, *, encoder: str = "all-MiniLM-L6-v2", tau: float = 20.0,
                      cache_file=None, device: str | None = None, progress: bool = False):
    """(PrefixTeacher, (P, D) teacher vectors) for training (query, item id) pairs.

    The queries are embedded once with the sentence-transformers ``encoder`` (cached in
    ``cache_file`` .npy when given, keyed by its length and first/last query)."""
    from pathlib import Path

    from ace.data.encoders import TextEncoder
    texts = [q for q, _ in pairs]
    if not texts:
        raise TeacherError("no training pairs to build the teacher from")
    rows = resolve_rows([i for _, i in pairs], id_tokenizer)
    vecs = None
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cached = np.load(cache_file, allow_pickle=False)
            if cached.shape[0] == len(texts) and np.isfinite(cached).all():
                vecs = cached
        except (OSError, ValueError):
            vecs = None   # unreadable cache: recompute and overwrite
    if vecs is None:
        vecs = TextEncoder(encoder, device=device).encode(texts, progress=progress)
        if cache_file is not None:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(cache_file) + ".tmp.npy")
            np.save(tmp, vecs)
            tmp.replace(cache_file)
    return PrefixTeacher.from_queries(vecs, rows, id_tokenizer.codes, vocab, tau=tau), vecs


# ----------------------------------------------------------------------------- anchor to a previous model


def anchor_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over the positions where ``mask``
    (B, T) is true; 0 when no position is selected. Logits (B, T, V) of the same teacher-forced input.
    Used by ``train.py fold`` to keep the folded model's outputs on replayed old pairs close to the
    previous model's (learning without forgetting); exactly 0 when both give the same logits."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise TeacherError(f"anchor logits must be (B, T, V) of one shape, got {tuple(student_logits.shape)} "
                           f"and {tuple(teacher_logits.shape)}")
    if mask.shape != student_logits.shape[:2]:
        raise TeacherError(f"anchor mask {tuple(mask.shape)} does not match (B, T) = {tuple(student_logits.shape[:2])}")
    mask = mask.bool()
    if not mask.any():
        return student_logits.new_zeros((), dtype=torch.float32)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)                     # (B, T)
    return kl[mask].mean()


class PreviousModel:
    """A frozen copy of a model before it is fine-tuned further (``train.py fold``): its next-token
    logits on a teacher-forced batch, the targets of ``anchor_kl``. Eval mode (no dropout), no gradients."""

    def __init__(self, model: torch.nn.Module):
        import copy

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device) -> "PreviousModel":
        self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """(B, T, V) logits for a training batch (input_ids, attention_mask, decoder_input_ids; a frozen
        encoder's cached ``encoder_layer_states`` are used when present: the previous model shares them)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "decoder_input_ids": batch["decoder_input_ids"]}
        states = batch.get("encoder_layer_states")
        if states is not None:
            from ace.model.modeling import AceEncoderOutput

            inputs["input_ids"] = None
            inputs["encoder_outputs"] = AceEncoderOutput(last_hidden_state=states[:, -1], layer_states=states)
        return self.model(**inputs).logits.float()
