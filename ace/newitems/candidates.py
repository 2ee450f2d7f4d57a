"""Where the hybrid scorer's candidates come from, for one batch of queries (ace/newitems/hybrid.py scores them).

- generative: the trie-constrained beam search's top-B, with the log-prob of their identifier levels and
  the query vector from the same encoder pass (``generative_candidates``);
- dense: the trie items nearest the query vector that the beams missed, their identifiers scored
  teacher-forced on the beam search's scale (``dense_candidates``, ``with_dense_candidates``);
- ``trained_depth``: how much of an identifier's prefix the model was trained to emit (used for added
  items, whose identifiers were never a training target).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ace.newitems.item_vectors import HybridError, ItemVectorSet


def sentence_vectors(last_hidden, attention_mask) -> np.ndarray:
    """(B, N, d) last encoder layer + (B, N) mask -> (B, d) float32: ``pooled_query`` L2-normalised."""
    import torch

    from ace.model.modeling import pooled_query

    mean = pooled_query(last_hidden[:, None], attention_mask.to(last_hidden.device))
    return torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy()


def generative_candidates(model, query_tokenizer, trie, vocab, queries: list[str], num_beams: int, *,
                          levels: str = "prefix", batch_size: int = 100, dense: tuple | None = None):
    """Generative top-B of each query with what the scorer needs, from one encoder pass per batch:
    (rows (Q, B) identifier-table rows, -1 pads; logprob (Q, B) of ``levels``; query vectors (Q, d)).
    ``dense``: see ``with_dense_candidates`` (rows (Q, B + D))."""
    from ace.model.decoding import constrained_beam_search

    device = next(model.parameters()).device
    rows, lps, qv = [], [], []
    for s in range(0, len(queries), batch_size):
        enc = query_tokenizer(queries[s:s + batch_size], max_length=model.config.max_query_length)
        state: dict = {}
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        items, full = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=num_beams, top_k=num_beams,
                                              state=state)
        rows.append(items.numpy())
        lps.append((state["prefix_scores"] if levels == "prefix" else full).numpy().astype(np.float64))
        qv.append(sentence_vectors(state["last_hidden"], mask))
        del state
    out = np.concatenate(rows), np.concatenate(lps), np.concatenate(qv)
    if dense is not None and dense[2] > 0:
        out = with_dense_candidates(model, query_tokenizer, trie, vocab, queries, *out, dense=dense, levels=levels,
                                    batch_size=batch_size)
    return out


def encoder_state(model, input_ids, attention_mask) -> dict:
    """The encoder pass the decoder steps need (the ``state`` a beam search leaves), without decoding."""
    import torch

    with torch.inference_mode():
        layers = model.eval().encode(input_ids, attention_mask)
        return {"last_hidden": layers[:, -1], "memory": model.decoder.memory(layers),
                "mask": attention_mask.bool()[:, None, None, :], "query": model.prototype_query(layers, attention_mask)}


def with_dense_candidates(model, query_tokenizer, trie, vocab, queries: list[str], rows: np.ndarray, logprob: np.ndarray,
                          query_vecs: np.ndarray, *, dense: tuple, levels: str = "prefix", batch_size: int = 100):
    """``generative_candidates``' (rows, logprob, query vectors) + ``dense`` = (vectors: ItemVectorSet whose rows
    are the table's rows, codes (n, L), D): the D trie items nearest each query vector that the beams missed,
    scored teacher-forced (``dense_candidates``) after one more encoder pass. Returns rows / logprob (Q, B + D)."""
    vset, codes, count = dense
    n_lv = vocab.length - 1 if levels == "prefix" else vocab.length
    device = next(model.parameters()).device
    add_rows, add_lp = [], []
    for s in range(0, len(queries), batch_size):
        enc = query_tokenizer(queries[s:s + batch_size], max_length=model.config.max_query_length)
        state = encoder_state(model, enc.input_ids.to(device), enc.attention_mask.to(device))
        drows, dlp = dense_candidates(model, state, trie, vocab, vset, codes, query_vecs[s:s + batch_size],
                                      rows[s:s + batch_size], count, n_lv)
        add_rows.append(drows)
        add_lp.append(dlp)
    return (np.concatenate([rows, np.concatenate(add_rows)], 1), np.concatenate([logprob, np.concatenate(add_lp)], 1),
            query_vecs)


def trained_depth(trie, codes: np.ndarray, levels: int) -> np.ndarray:
    """(..., L) identifier codes -> (...,) how many of their first ``levels`` codes form a prefix the model
    was trained to emit: the depth of the deepest prefix shared with an item of the generative ``trie``
    (0 when ``trie`` is None)."""
    codes = np.asarray(codes)
    depth = np.zeros(codes.shape[:-1], dtype=np.int64)
    if trie is None:
        return depth
    nodes = np.zeros_like(depth)             # the root; -1 once a prefix leaves the trie (and stays -1)
    for level in range(levels):
        nodes = trie.child(nodes, codes[..., level])
        depth += nodes >= 0
    return depth


@dataclass
class DensePool:
    """The items a dense scan may add as candidates: every trie item with a text-space vector. ``ids``,
    unit ``vectors`` (n, d) float32, identifier ``codes`` (n, L), and ``stored`` (n,): each one's row in the
    scorer's stored vectors, -1 for a vector built after training (an item folded in later)."""
    ids: list[str]
    vectors: np.ndarray
    codes: np.ndarray
    stored: np.ndarray

    def __post_init__(self):
        self.codes, self.stored = np.asarray(self.codes, dtype=np.int64), np.asarray(self.stored, dtype=np.int64)
        if not (len(self.ids) == len(self.vectors) == len(self.codes) == len(self.stored)):
            raise HybridError(f"dense pool: {len(self.ids)} ids, {len(self.vectors)} vectors, {len(self.codes)} "
                              f"identifiers, {len(self.stored)} stored rows")
        self.index = {iid: j for j, iid in enumerate(self.ids)}

    @classmethod
    def build(cls, vectors: ItemVectorSet, table_ids: list[str], table_codes: np.ndarray,
              extra: dict[str, np.ndarray] | None = None, exclude=()) -> "DensePool":
        """The stored ``vectors`` still in the identifier table (and still in ``vectors.row``: a view may
        withdraw some, giving them anew in ``extra``) + the ``extra`` vectors (id -> unit vector) of other
        table items; ``exclude``: ids never in the pool (added items, served outside the trie)."""
        pos = {iid: r for r, iid in enumerate(table_ids)}
        table_codes, exclude = np.asarray(table_codes), set(exclude)
        stored = [r for r, iid in enumerate(vectors.ids) if iid in pos and iid in vectors.row and iid not in exclude]
        later = [iid for iid in (extra or {}) if iid in pos and iid not in vectors.row and iid not in exclude]
        ids = [vectors.ids[r] for r in stored] + later
        vecs = [vectors.decode(np.asarray(stored, dtype=np.int64)).reshape(len(stored), vectors.dim)]
        if later:
            vecs.append(np.stack([np.asarray(extra[i], dtype=np.float32) for i in later]))
        codes = np.asarray([table_codes[pos[i]] for i in ids], dtype=np.int64).reshape(len(ids), table_codes.shape[1])
        return cls(ids, np.concatenate(vecs).astype(np.float32), codes, np.asarray(stored + [-1] * len(later)))

    def positions(self, cand_ids: list[list[str | None]]) -> np.ndarray:
        """(Q, B) pool positions of candidate ids (-1: none, or not in the pool)."""
        return np.asarray([[self.index.get(i, -1) if i is not None else -1 for i in row] for row in cand_ids],
                          dtype=np.int64).reshape(len(cand_ids), -1)


def nearest_pool_items(pool: DensePool, query_vecs: np.ndarray, in_trie: np.ndarray, taken: np.ndarray,
                       count: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions (Q, count) in ``pool``, -1 pads; their cosines) of the pool items nearest each query vector
    (exact scan) among those ``in_trie`` (n,) bool, skipping ``taken`` (Q, B) positions (the query's
    generative candidates; -1 pads); -1 pads when fewer are left."""
    n = len(pool.ids)
    cos = np.asarray(query_vecs, dtype=np.float32) @ pool.vectors.T                          # (Q, n)
    cos = np.where(np.asarray(in_trie, dtype=bool)[None, :], cos, -np.inf)
    taken = np.asarray(taken)
    q_idx = np.repeat(np.arange(len(cos)), taken.shape[1])
    t = taken.ravel()
    cos[q_idx[t >= 0], t[t >= 0]] = -np.inf
    top = np.argsort(-cos, axis=1, kind="stable")[:, :min(count, n)]
    best = np.take_along_axis(cos, top, 1)
    return np.where(np.isfinite(best), top, -1), np.where(np.isfinite(best), best, 0.0)


def pool_candidates(model, state: dict, trie, vocab, pool: DensePool, query_vecs: np.ndarray, taken: np.ndarray,
                    count: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``count`` items of ``pool`` in ``trie`` nearest each query vector that are not ``taken`` (Q, B pool
    positions), with the teacher-forced log-prob of their first ``levels`` identifier tokens (every level of
    a trie item was trained, so it is on the beam search's scale); ``state``: the beam search's encoder pass.
    Returns (positions (Q, count) in ``pool``, -1 pads; logprob (Q, count), -inf at pads; cosines, 0 at pads)."""
    import torch

    from ace.model.decoding import score_identifiers

    if pool.codes.ndim != 2 or pool.codes.shape[1] != vocab.length:
        raise HybridError(f"dense candidates need {vocab.length}-token identifiers, got codes of shape {pool.codes.shape}")
    safe = np.maximum(pool.codes, 0)
    in_trie = (pool.codes.min(1) >= 0) & (trained_depth(trie, safe, vocab.length) == vocab.length)
    pos, cos = nearest_pool_items(pool, query_vecs, in_trie, taken, count)                  # (Q, D)
    Q = len(pos)
    device = next(model.parameters()).device
    toks = torch.as_tensor(vocab.encode(safe[np.maximum(pos, 0)].reshape(-1, vocab.length)),
                           dtype=torch.long, device=device).reshape(Q, -1, vocab.length)
    lp = score_identifiers(model, state["memory"], state["mask"], toks, levels,
                           query=state["query"]).cpu().numpy().astype(np.float64)                  # (Q, D)
    return pos, np.where(pos >= 0, lp, -np.inf), cos


def dense_candidates(model, state: dict, trie, vocab, vectors: ItemVectorSet, codes: np.ndarray, query_vecs: np.ndarray,
                     taken: np.ndarray, count: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """``pool_candidates`` over the stored item ``vectors`` alone, whose rows are the identifier table's
    (the hybrid fit and the quality bench): ``codes`` (n, L) the identifier of each row, -1 rows for items
    no longer in the table; ``taken`` (Q, B) rows. Returns (rows (Q, count) of ``vectors``, -1 pads; logprob)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) != len(vectors.ids) or codes.shape[1] != vocab.length:
        raise HybridError(f"dense candidates need the identifier of every stored item vector: got codes of shape "
                          f"{codes.shape} for {len(vectors.ids)} vectors of {vocab.length}-token identifiers")
    n = len(vectors.ids)
    pool = DensePool(list(vectors.ids), vectors.decode(np.arange(n)).reshape(n, vectors.dim), codes, np.arange(n))
    pos, lp, _ = pool_candidates(model, state, trie, vocab, pool, query_vecs, taken, count, levels)
    return pos, lp
