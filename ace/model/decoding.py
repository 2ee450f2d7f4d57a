"""Trie-constrained beam search over fixed-length identifiers (k, v1..vM, u).

At step d every beam may only take a code that extends its prefix in the ``FlatTrie``. The mask
is built from the trie arrays for all beams at once: the children slices of the beams' nodes are
gathered with ``repeat_interleave`` and scattered into a (B*W, level_size) table, so each step
costs O(beams x children) whatever the trie size, and no Python runs per beam.

Speed levers (all used): encoder outputs and every decoder layer's cross-attention keys/values
are computed once per query and shared by its beams (beams are the query rows of cross-
attention, nothing is copied); decoder self-attention keys/values are cached across steps and
reordered by index; ``torch.inference_mode``; ``quantize_dynamic_int8`` for CPU serving.
On a busy CPU, one intra-op thread per process (``torch.set_num_threads(1)``) is much faster than
two: see benchmarks/results/decoding.md.

Scores are sums of log-softmax over the full identifier vocabulary (masking comes after the
softmax, as in transformers' beam search with ``prefix_allowed_tokens_fn``).
"""
from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
import torch.nn as nn

from .tokens import BOS, IdentifierVocab


class DecodingError(ValueError):
    """Beam search arguments do not fit together (sizes, levels, beams)."""


_TRIE_TENSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _trie_tensors(trie, device: torch.device) -> dict:
    """The FlatTrie arrays as torch tensors on ``device`` (cached per trie and device)."""
    per_trie = _TRIE_TENSORS.setdefault(trie, {})
    key = str(device)
    if key not in per_trie:
        per_trie[key] = {name: torch.as_tensor(np.asarray(getattr(trie, name), dtype=np.int64)).to(device)
                         for name in ("child_start", "child_count", "child_code", "child_node", "leaf_item")}
    return per_trie[key]


def _check(model, input_ids, trie, vocab: IdentifierVocab, num_beams: int, top_k: int | None) -> int:
    if not isinstance(input_ids, torch.Tensor):
        raise DecodingError(f"input_ids must be a torch tensor (B, N) from QueryTokenizer, got {type(input_ids).__name__}")
    if num_beams < 1:
        raise DecodingError(f"num_beams must be >= 1, got {num_beams}")
    top_k = num_beams if top_k is None else int(top_k)
    if not 1 <= top_k <= num_beams:
        raise DecodingError(f"top_k={top_k} must be in [1, num_beams={num_beams}]")
    sizes = list(vocab.level_sizes)
    if list(model.config.level_sizes) != sizes:
        raise DecodingError(f"model level_sizes {list(model.config.level_sizes)} != vocabulary level_sizes {sizes}")
    if trie is not None and list(trie.level_sizes) != sizes:
        raise DecodingError(f"trie level_sizes {list(trie.level_sizes)} != vocabulary level_sizes {sizes}")
    return top_k


def _allowed_children(nodes: torch.Tensor, tt: dict, level_size: int):
    """nodes (R,) trie nodes (-1 = dead beam) -> additive mask (R, C) (0 allowed, -inf not) and
    child-node table (R, C) (-1 where no child); O(R x children)."""
    R = nodes.shape[0]
    safe = nodes.clamp_min(0)
    count = torch.where(nodes >= 0, tt["child_count"].index_select(0, safe), 0)      # (R,)
    start = tt["child_start"].index_select(0, safe)                                  # (R,)
    first = torch.cumsum(count, 0) - count                                            # (R,)
    E = int(count.sum())
    rows = torch.repeat_interleave(torch.arange(R, device=nodes.device), count, output_size=E)   # (E,)
    edge = torch.arange(E, device=nodes.device) + torch.repeat_interleave(start - first, count, output_size=E)
    flat = rows * level_size + tt["child_code"].index_select(0, edge)                # (E,) cell of each edge
    mask = torch.full((R * level_size,), float("-inf"), device=nodes.device)
    mask.index_fill_(0, flat, 0.0)
    child = torch.full((R * level_size,), -1, dtype=torch.long, device=nodes.device)
    child.index_copy_(0, flat, tt["child_node"].index_select(0, edge))
    return mask.view(R, level_size), child.view(R, level_size)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _beam_search(model, input_ids, attention_mask, vocab, num_beams, tt, roots=None, state=None):
    """Run the search in eval mode (dropout off), restoring the model's mode afterwards."""
    with _eval_mode(model):
        return _beam_search_loop(model, model.encode(input_ids, attention_mask), attention_mask, vocab, num_beams,
                                 tt, roots, state)


class _eval_mode:
    """Dropout off for a search; a model already in eval mode (a served one) is left alone: switching
    every submodule's mode back and forth costs milliseconds per call."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train(True)


def _beam_search_loop(model, layers, attention_mask, vocab: IdentifierVocab, num_beams: int, tt: dict | None,
                      roots: torch.Tensor | None = None, state: dict | None = None):
    """Shared loop over an encoder pass ``layers`` (B, S, N, d): returns final tokens (B, W, L), scores (B, W)
    sorted, trie nodes (B, W) or None. ``roots`` (B,): the trie node each query starts from (default: node 0).

    With a ``state`` dict it also fills in what a re-scorer needs from the same pass: ``last_hidden``
    (B, N, d) (the encoder's last layer), ``memory`` / ``mask`` (for ``score_identifiers``) and
    ``prefix_scores`` (B, W): each final beam's score before its last level (u)."""
    L = vocab.length
    B = layers.shape[0]
    device = layers.device
    memory = model.decoder.memory(layers)                                           # once per query
    query = model.prototype_query(layers, attention_mask)                           # prototype heads (or None)
    mask = attention_mask.bool()[:, None, None, :]                                  # (B, 1, 1, N)
    scores = torch.zeros(B, 1, device=device)                                       # (B, W=1)
    tokens = torch.full((B, 1, 0), BOS, dtype=torch.long, device=device)            # (B, W, t)
    prev = torch.full((B, 1), BOS, dtype=torch.long, device=device)                 # (B, W)
    nodes = None
    if tt is not None:
        nodes = roots.view(B, 1).to(device) if roots is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
    cache: list = []
    for d in range(L):
        W = prev.shape[1]
        logits, cache = model.decoder.step(prev, d, memory, mask, cache, query=query)  # (B, W, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if tt is not None:
            lo, hi = vocab.level_range(d)
            C = hi - lo
            allowed, child = _allowed_children(nodes.reshape(-1), tt, C)            # (B*W, C)
            cand = logp[..., lo:hi] + allowed.view(B, W, C)
        else:
            lo, C = 0, logp.shape[-1]
            cand = logp
        before = scores
        cand = (scores[..., None] + cand).reshape(B, W * C)
        W_new = min(num_beams, W * C)
        scores, idx = cand.topk(W_new, dim=1)                                       # (B, W_new), sorted
        src, code = idx // C, idx % C                                               # source beam, code
        flat_src = (torch.arange(B, device=device)[:, None] * W + src).reshape(-1)  # (B*W_new,)
        prev = code + lo                                                            # token ids
        tokens = torch.cat([tokens.reshape(B * W, -1)[flat_src].view(B, W_new, -1), prev[..., None]], dim=2)
        if tt is not None:
            nodes = child[flat_src, code.reshape(-1)].view(B, W_new)
            nodes = torch.where(torch.isfinite(scores), nodes, -1)
        cache = [(k.index_select(0, flat_src), v.index_select(0, flat_src)) for k, v in cache]
    if state is not None:
        state.update(last_hidden=layers[:, -1], memory=memory, mask=mask, query=query,
                     prefix_scores=before.reshape(-1)[flat_src].view(B, -1))
    return tokens, scores, nodes


def _per_query(num_beams, top_k, B: int) -> tuple[np.ndarray, np.ndarray]:
    """num_beams / top_k (an int, or one value per query; top_k None = the beam width) -> (B,) arrays."""
    widths = np.asarray(num_beams, dtype=np.int64).reshape(-1)
    ks = widths if top_k is None else np.asarray(top_k, dtype=np.int64).reshape(-1)
    for name, v in (("num_beams", widths), ("top_k", ks)):
        if v.size not in (1, B):
            raise DecodingError(f"{name} must be one value or one per query ({B}), got {v.size}")
    return np.broadcast_to(widths, (B,)), np.broadcast_to(ks, (B,))


@torch.inference_mode()
def constrained_beam_search(model, input_ids, attention_mask, trie, vocab: IdentifierVocab, num_beams=5,
                            top_k=None, roots=None, state: dict | None = None):
    """Top-k distinct valid items per query: (item_index int64 (B, top_k), -1 padded; logprob (B, top_k)).

    ``item_index`` are ``trie.leaf_item`` values (row indices into the identifier table);
    ``logprob`` is the identifier's summed log-probability (-inf where padded).
    ``num_beams`` / ``top_k``: one value, or one per query (a mixed batch: one encoder pass, then one
    decode per distinct beam width, each query with its own width - the same results as separate calls;
    the output is padded to the largest top_k).
    ``roots`` (B,) int: the node each query decodes from, for a ``FlatTrie.forest`` of several tries
    (queries searching different subsets in one batch); default the root, node 0. A ``state`` dict
    receives the encoder pass and per-beam prefix scores (see ``_beam_search_loop``; its
    ``prefix_scores`` are cut to top_k and -inf where padded, like ``logprob``; one beam width only)."""
    if isinstance(input_ids, torch.Tensor):
        widths, ks = _per_query(num_beams, top_k, input_ids.shape[0])
        if len(set(widths.tolist())) > 1 or len(set(ks.tolist())) > 1:
            for w, k in zip(widths.tolist(), ks.tolist()):
                _check(model, input_ids, trie, vocab, w, k)
            if state is not None:
                raise DecodingError("state= needs one beam width and top_k for the whole batch")
            return _mixed_widths(model, input_ids, attention_mask, trie, vocab, widths, ks, roots)
        num_beams, top_k = _first(num_beams), None if top_k is None else _first(top_k)
    top_k = _check(model, input_ids, trie, vocab, num_beams, top_k)
    device = _model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    tt = _trie_tensors(trie, device)
    roots = _roots(roots, input_ids.shape[0], trie)
    _, scores, nodes = _beam_search(model, input_ids, attention_mask, vocab, num_beams, tt, roots, state)
    items, scores = _leaves(nodes, scores, tt)
    if state is not None:
        prefix = torch.where(items >= 0, state["prefix_scores"], float("-inf"))
        state["prefix_scores"] = _pad_to(items[:, :top_k], prefix[:, :top_k], top_k)[1]
    return _pad_to(items[:, :top_k], scores[:, :top_k], top_k)


def _first(value) -> int:
    return int(np.asarray(value).reshape(-1)[0])


def _most(num_beams, top_k) -> int:
    """The widest result: the largest top_k (or beam width when top_k is None) of one value or one per query."""
    return int(np.max(np.asarray(num_beams if top_k is None else top_k)))


def _roots(roots, B: int, trie) -> torch.Tensor | None:
    if roots is None:
        return None
    roots = torch.as_tensor(np.asarray(roots, dtype=np.int64))
    if roots.shape != (B,) or (roots < 0).any() or (roots >= trie.num_nodes).any():
        raise DecodingError(f"roots must be {B} node ids of the trie (0..{trie.num_nodes - 1}), "
                            f"got shape {tuple(roots.shape)}")
    return roots


def _leaves(nodes, scores, tt):
    """Final beams -> (item rows, -1 where none; scores, -inf where no item)."""
    items = torch.where(nodes >= 0, tt["leaf_item"][nodes.clamp_min(0)], -1)
    items = torch.where(torch.isfinite(scores), items, -1)
    return items, torch.where(items >= 0, scores, float("-inf"))


def _mixed_widths(model, input_ids, attention_mask, trie, vocab, widths: np.ndarray, ks: np.ndarray, roots):
    """``constrained_beam_search`` for queries with different beam widths / top_k: the encoder runs once for
    the batch, the decoder once per distinct width over that width's queries (so a wide query never widens
    another's beams); each query's results cut to its own top_k, padded to the largest."""
    device = _model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    tt = _trie_tensors(trie, device)
    roots = _roots(roots, input_ids.shape[0], trie)
    K = int(ks.max())
    out_items = torch.full((len(ks), K), -1, dtype=torch.long)
    out_scores = torch.full((len(ks), K), float("-inf"))
    with _eval_mode(model):
        layers = model.encode(input_ids, attention_mask)                            # one encoder pass
        for w in sorted(set(widths.tolist())):
            rows = np.flatnonzero(widths == w)
            sel = torch.as_tensor(rows, device=device)
            _, scores, nodes = _beam_search_loop(model, layers.index_select(0, sel), attention_mask.index_select(0, sel),
                                                 vocab, w, tt, None if roots is None else roots[torch.as_tensor(rows)])
            items, scores = _pad_to(*_leaves(nodes, scores, tt), K)
            keep = torch.arange(items.shape[1])[None, :] < torch.as_tensor(ks[rows])[:, None]  # each query's top_k
            out_items[rows] = torch.where(keep, items, -1)[:, :K]
            out_scores[rows] = torch.where(keep, scores, float("-inf"))[:, :K]
    return out_items, out_scores


@torch.inference_mode()
def score_identifiers(model, memory, mask, tokens: torch.Tensor, levels: int, query=None, *,
                      per_level: bool = False) -> torch.Tensor:
    """Teacher-forced log-probability of given identifiers' first ``levels`` tokens.

    ``memory`` / ``mask``: the encoder pass of B queries (``constrained_beam_search(state=...)``);
    ``tokens`` (B, P, >= levels) identifier token ids (``IdentifierVocab.encode``), P candidates per
    query; ``query``: the pooled query of prototype heads (``state["query"]``). Returns (B, P): sum
    over levels of log-softmax over the whole identifier vocabulary, the score the beam search gives
    the same prefix; ``per_level``: (B, P, levels), each level's term of that sum."""
    B, P = tokens.shape[:2]
    if tokens.dim() != 3 or tokens.shape[0] != mask.shape[0] or tokens.shape[2] < levels:
        raise DecodingError(f"tokens must be (B={mask.shape[0]}, P, >= {levels}), got {tuple(tokens.shape)}")
    out = torch.zeros(B, P, levels, device=tokens.device)
    if P == 0:
        return out if per_level else out.sum(-1)
    was_training = model.training
    model.eval()
    try:
        prev = torch.full((B, P), BOS, dtype=torch.long, device=tokens.device)
        cache: list = []
        for d in range(levels):
            logits, cache = model.decoder.step(prev, d, memory, mask, cache, query=query)  # (B, P, V)
            logp = torch.log_softmax(logits.float(), dim=-1)
            prev = tokens[:, :, d]
            out[:, :, d] = logp.gather(2, prev[..., None])[..., 0]
    finally:
        model.train(was_training)
    return out if per_level else out.sum(-1)


@torch.inference_mode()
def unconstrained_beam_search(model, input_ids, attention_mask, trie, vocab: IdentifierVocab, num_beams: int = 5,
                              top_k: int | None = None, keep_invalid: bool = False):
    """Ablation: beam search over the whole identifier vocabulary, no trie. Returned sequences that
    are not identifiers of the trie are dropped and counted; with ``keep_invalid`` they keep their
    rank as -1 (a miss that still takes its slot) instead of the valid ones moving up.

    Returns (item_index (B, top_k) -1 padded, logprob (B, top_k), num_invalid int)."""
    top_k = _check(model, input_ids, trie, vocab, num_beams, top_k)
    device = _model_device(model)
    tokens, scores, _ = _beam_search(model, input_ids.to(device), attention_mask.to(device), vocab,
                                     num_beams, None)
    tokens, scores = tokens[:, :top_k].cpu().numpy(), scores[:, :top_k].cpu()
    B, K, L = tokens.shape
    codes = tokens.reshape(-1, L) - np.asarray(vocab.offsets)[None, :]             # (B*K, L)
    in_range = ((codes >= 0) & (codes < np.asarray(vocab.level_sizes)[None, :])).all(1)
    items = np.full(B * K, -1, dtype=np.int64)
    if in_range.any():
        items[in_range] = trie.lookup_rows(codes[in_range])
    items = items.reshape(B, K)
    num_invalid = int((items < 0).sum())
    # drop invalid ones, keep the valid ones in score order at the front (or in place: keep_invalid)
    order = np.argsort(items < 0, axis=1, kind="stable") if not keep_invalid else np.tile(np.arange(K), (B, 1))
    items = np.take_along_axis(items, order, 1)
    scores = torch.gather(scores, 1, torch.from_numpy(order))
    items_t = torch.from_numpy(items)
    scores = torch.where(items_t >= 0, scores, float("-inf"))
    items_t, scores = _pad_to(items_t, scores, top_k)
    return items_t, scores, num_invalid


def _pad_to(items: torch.Tensor, scores: torch.Tensor, top_k: int):
    """Pad (B, W) results with -1 / -inf to (B, top_k) (when fewer beams than top_k exist)."""
    B, W = items.shape
    if W < top_k:
        items = torch.cat([items, items.new_full((B, top_k - W), -1)], 1)
        scores = torch.cat([scores, scores.new_full((B, top_k - W), float("-inf"))], 1)
    return items.cpu(), scores.cpu()


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with dynamic int8 Linear layers for CPU serving (weights int8,
    activations quantised per batch on the fly)."""
    from torch.ao.quantization import quantize_dynamic
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    return starts


@torch.inference_mode()
def search_batches(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie, vocab: IdentifierVocab, *,
                   num_beams, top_k=None, batch_size: int = 100, constrained: bool = True,
                   keep_invalid: bool = False, progress: bool = False, desc: str = "search", roots=None):
    """Beam search over already tokenised queries, ``batch_size`` rows at a time.

    Returns (item_index int64 (N, top_k), -1 padded; logprob float (N, top_k); invalid count): the
    concatenation of ``constrained_beam_search`` (or ``unconstrained_beam_search`` with
    ``constrained=False``; invalid count 0 when constrained) over the batches. ``roots`` (N,): each query's
    start node in a ``FlatTrie.forest`` (constrained only). ``num_beams`` / ``top_k`` may give one value per
    query (constrained only; the output is then padded to the largest top_k)."""
    rows, scores, invalid = [], [], 0
    k = _most(num_beams, top_k)
    per_query = np.ndim(num_beams) > 0 or np.ndim(top_k) > 0
    if per_query and not constrained:
        raise DecodingError("per-query num_beams / top_k need the constrained search")
    for s in _batches(input_ids.shape[0], batch_size, progress, desc):
        args = (model, input_ids[s:s + batch_size], attention_mask[s:s + batch_size], trie, vocab)
        if per_query:
            widths, ks = _per_query(num_beams, top_k, input_ids.shape[0])
            r, sc = _pad_to(*constrained_beam_search(*args, num_beams=widths[s:s + batch_size],
                                                     top_k=ks[s:s + batch_size],
                                                     roots=None if roots is None else roots[s:s + batch_size]), k)
        elif constrained:
            r, sc = constrained_beam_search(*args, num_beams=num_beams, top_k=top_k,
                                            roots=None if roots is None else roots[s:s + batch_size])
        else:
            r, sc, bad = unconstrained_beam_search(*args, num_beams=num_beams, top_k=top_k, keep_invalid=keep_invalid)
            invalid += bad
        rows.append(r)
        scores.append(sc)
    if not rows:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k)), 0
    return torch.cat(rows).numpy(), torch.cat(scores).numpy(), invalid


@torch.inference_mode()
def search_texts(model, query_tokenizer, queries: list[str], trie, vocab: IdentifierVocab, *, num_beams,
                 top_k=None, batch_size: int = 100, max_length: int | None = None,
                 constrained: bool = True, keep_invalid: bool = False, progress: bool = False, desc: str = "search",
                 roots=None):
    """``search_batches`` for query texts, tokenised one batch at a time (to the model's
    ``max_query_length`` unless ``max_length``): the one batched searcher of the retriever and the
    benchmarks. Returns (item_index (N, top_k), logprob (N, top_k), invalid count). ``num_beams`` /
    ``top_k``: one value or one per query (see ``constrained_beam_search``)."""
    max_length = max_length or model.config.max_query_length
    rows, scores, invalid = [], [], 0
    per_query = np.ndim(num_beams) > 0 or np.ndim(top_k) > 0
    if per_query:
        num_beams, top_k = _per_query(num_beams, top_k, len(queries))
    k = _most(num_beams, top_k)
    for s in _batches(len(queries), batch_size, progress, desc):
        enc = query_tokenizer(list(queries[s:s + batch_size]), max_length=max_length)
        r, sc, bad = search_batches(model, enc.input_ids, enc.attention_mask, trie, vocab,
                                    num_beams=num_beams[s:s + batch_size] if per_query else num_beams,
                                    top_k=top_k[s:s + batch_size] if per_query else top_k, batch_size=len(enc.input_ids), constrained=constrained,
                                    keep_invalid=keep_invalid, roots=None if roots is None else roots[s:s + batch_size])
        rows.append(r)
        scores.append(sc)
        invalid += bad
    if not rows:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k)), 0
    return np.concatenate(rows), np.concatenate(scores), invalid
