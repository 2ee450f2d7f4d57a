"""Hybrid operating point: re-score generative candidates by ``log-prob + w * cosine(query, item vector)``.

One scorer for every candidate, whatever produced it:

    score(q, item) = log P(identifier prefix of item | q) + w * cos(v_q, v_item)

- ``log P``: the model's summed log-probability of the item's first ``levels`` identifier tokens
  (``prefix``: k, v1..vM, the semantic part; ``full``: + u). Generative candidates carry it from
  the beam search; an item added after training (fallback) has an identifier from the fitted
  tokenizer too, so its prefix is scored teacher-forced by the same model
  (``ace.decoding.score_identifiers``) and the two paths rank on one scale.
- ``v_q``: the sentence vector of the query from the encoder pass the model already runs for
  decoding (attention-masked mean of its last encoder layer, L2-normalised; for the recipe's
  frozen all-MiniLM-L6-v2 this is exactly the sentence-transformers embedding). No second encoder.
- ``v_item``: the item vector in that same text space, built from the item's texts by the same
  encoder (``ItemVectorSet``): ``document`` (its description) or ``doc_plus_queries`` (normalised
  mean of its description and its training queries, as DT document+queries). Stored as float32,
  int8 (per-row scale) or product-quantisation codes (``storage``).
- ``w``: fitted on held-out *training* queries the model never trained on
  (``split.scorer_queries`` -> RUN/scorer_queries.json), never on test queries.
- folded items' offsets: an item folded in after training may carry an additive log-prob offset its fold
  fitted on validation queries (a freshly fine-tuned decoder's log-probs of the items it was just trained
  on need not be on the old items' scale; ``ace.pipeline.fold_gate.fit_offset``), read from RUN/model/folded_offsets.json (``read_offsets``).
- candidates (``ace/newitems/candidates.py``): the beam search's top-B; with ``dense_candidates`` D > 0
  also the D trie items nearest v_q that the beams missed (an exact scan of the trie items' vectors,
  stored or built for items folded in later: for corpora where that scan is affordable), their identifiers scored teacher-forced; added items from
  the fallback index (``search_merged``).

The pipeline stage ``hybrid`` (``ace.pipeline.hybrid_stage.build_run_hybrid``) writes RUN/hybrid/: ``vectors.npz``,
``item_ids.json``, ``scorer.json`` (w, levels, storage, fit figures).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ace.newitems.added_scores import (candidate_vectors, item_signatures, neighbour_completion,
                                       signature_completion, untrained_completion)
from ace.newitems.candidates import DensePool, encoder_state, pool_candidates, sentence_vectors, trained_depth
from ace.newitems.item_vectors import STORAGES, HybridError, ItemVectorSet, check_vectors  # noqa: F401 (re-exported)

SOURCES = ("document", "doc_plus_queries")
LEVELS = ("prefix", "full")
ADDED_LEVELS = ("trained", "none", "signature")
FORMAT_VERSION = 1


@dataclass
class HybridConfig:
    """Pipeline section ``hybrid:`` (stage ``hybrid``, after ``train``)."""
    enabled: bool = False                    # needs split.scorer_queries > 0 (held-out queries to fit w on)
    item_vectors: str = "doc_plus_queries"   # document | doc_plus_queries
    storage: str = "float32"                 # float32 | int8 | pq
    pq_bytes: int = 48                       # PQ sub-quantisers (bytes per item at 8 bits each); must divide the dim
    levels: str = "prefix"                   # identifier levels in the log-prob: prefix (k..vM) | full (+ u)
    candidates: int = 50                     # generative top-B re-scored (beams = B)
    dense_candidates: int = 0                # + the D trie items nearest the query vector (exact scan; 0 = off)
    added_levels: str = "none"               # which levels of an added item's identifier keep their own log-prob in
                                             # merged search: none (every level at the best candidate's: the cosine
                                             # decides) | trained (those it shares with a trained item; before
                                             # session 7) | signature (the model's own view of the item:
                                             # ``signature_completion``); see search_merged and quality.md 12.2
    added_neighbour: float = 0.0             # with added_levels none: an added item takes the log-prob of the query's
                                             # candidate most like it, less added_neighbour * w * (1 - their cosine)
                                             # (``neighbour_completion``); 0 = the best candidate's, whatever it is
    added_boost: float = 0.0                 # nats added to every added (fallback) item's log-prob in merged search:
                                             # how far added items are favoured over trained ones (quality.md 15:
                                             # a test window exists; the probe's validation fit reads it too high)
    weights: list[float] = field(default_factory=lambda: [0.0] + [round(float(x), 4) for x in np.geomspace(0.25, 256, 31)])

    def __post_init__(self):
        if self.item_vectors not in SOURCES:
            raise HybridError(f"hybrid.item_vectors must be one of {SOURCES}, got {self.item_vectors!r}")
        if self.storage not in STORAGES:
            raise HybridError(f"hybrid.storage must be one of {STORAGES}, got {self.storage!r}")
        if self.levels not in LEVELS:
            raise HybridError(f"hybrid.levels must be one of {LEVELS}, got {self.levels!r}")
        if self.candidates < 1 or self.pq_bytes < 1:
            raise HybridError(f"hybrid.candidates and hybrid.pq_bytes must be >= 1 ({self.candidates}, {self.pq_bytes})")
        if self.added_levels not in ADDED_LEVELS:
            raise HybridError(f"hybrid.added_levels must be one of {ADDED_LEVELS}, got {self.added_levels!r}")
        if self.dense_candidates < 0:
            raise HybridError(f"hybrid.dense_candidates must be >= 0, got {self.dense_candidates}")
        if not math.isfinite(self.added_boost):
            raise HybridError(f"hybrid.added_boost must be a finite number of nats, got {self.added_boost}")
        if not math.isfinite(self.added_neighbour) or self.added_neighbour < 0:
            raise HybridError(f"hybrid.added_neighbour must be finite and >= 0, got {self.added_neighbour}")
        if not self.weights or any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise HybridError(f"hybrid.weights must be finite and >= 0, got {self.weights}")


# ----------------------------------------------------------------------------- vectors


def encode_texts(model, query_tokenizer, texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """Sentence vectors (n, d) of ``texts`` from the model's own encoder (the query-side text space)."""
    import torch

    out = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = query_tokenizer(texts[s:s + batch_size], max_length=model.config.max_query_length)
                ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
                out.append(sentence_vectors(model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.d_model), np.float32)


def item_texts(description: str | None, queries: list[str], source: str) -> list[str]:
    """The texts an item vector averages: its description (document) and, for doc_plus_queries, its
    training queries; duplicates counted once (the caption proxy's document is also a training query)."""
    texts = [description] if description else []
    if source == "doc_plus_queries":
        texts += queries
    return list(dict.fromkeys(t for t in texts if t and t.strip()))


def mean_vectors(groups: list[list[str]], encode, ids: list[str]) -> np.ndarray:
    """Normalised mean of the unit text vectors of each group -> (n, d); ``encode(texts) -> (m, d)``."""
    empty = [ids[i] for i, g in enumerate(groups) if not g]
    if empty:
        raise HybridError(f"{len(empty)} item(s) have no text for a hybrid item vector (no description, captions or "
                          f"training queries), e.g. {empty[:5]}")
    flat = [t for g in groups for t in g]
    vecs = encode(flat).astype(np.float64)
    out, s = [], 0
    for g in groups:
        out.append(vecs[s:s + len(g)].mean(0))
        s += len(g)
    out = np.stack(out)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- the scorer


def fuse(logprob: np.ndarray, cosine: np.ndarray, weight: float) -> np.ndarray:
    """The hybrid score: log-prob + w * cosine (-inf stays -inf)."""
    return np.asarray(logprob, dtype=np.float64) + float(weight) * np.asarray(cosine, dtype=np.float64)


def rerank_order(items: np.ndarray, logprob: np.ndarray, cosine: np.ndarray, weight: float):
    """(order (Q, P), fused scores (Q, P)): each row's candidates sorted best first; -1 items last."""
    score = np.where(np.asarray(items) >= 0, fuse(logprob, cosine, weight), -np.inf)
    return np.argsort(-score, axis=1, kind="stable"), score


def rerank(items: np.ndarray, logprob: np.ndarray, cosine: np.ndarray, weight: float):
    """(items, fused scores) of each row sorted best first; -1 items / -inf scores last."""
    order, score = rerank_order(items, logprob, cosine, weight)
    return np.take_along_axis(np.asarray(items), order, 1), np.take_along_axis(score, order, 1)


def fit_weight(items: np.ndarray, logprob: np.ndarray, cosine: np.ndarray, targets: np.ndarray,
               weights: list[float]) -> dict:
    """The w of ``weights`` with the best MRR (over the candidate lists) on validation queries.

    items (Q, P) candidate rows (-1 pads), targets (Q,) gold rows. Returns the fit record:
    weight, per-weight R@1 / MRR, the candidate recall (gold among the P candidates)."""
    if len(items) == 0:
        raise HybridError("no validation queries to fit the hybrid weight on (set split.scorer_queries > 0)")
    targets = np.asarray(targets)[:, None]
    table = []
    for w in weights:
        ranked, _ = rerank(items, logprob, cosine, w)
        hit = ranked == targets
        pos = np.where(hit.any(1), hit.argmax(1), -1)
        table.append({"w": float(w), "R@1": float(100 * (pos == 0).mean()),
                      "MRR": float(100 * np.where(pos >= 0, 1.0 / (np.maximum(pos, 0) + 1), 0.0).mean())})
    best = max(table, key=lambda r: (r["MRR"], r["R@1"], -r["w"]))
    return {"weight": best["w"], "queries": int(len(items)),
            "candidate_recall": float(100 * (np.asarray(items) == targets).any(1).mean()),
            "val_at_weight": best, "val_generative_only": table[0] if weights[0] == 0 else None, "grid": table}


@dataclass
class HybridScorer:
    """A run's fitted scorer: item vectors + w + the identifier levels in the log-prob."""
    vectors: ItemVectorSet
    weight: float
    levels: str
    candidates: int
    info: dict
    dense_candidates: int = 0   # trie items nearest the query vector added to the generative candidates
    added_levels: str = "trained"   # HybridConfig.added_levels (a scorer.json without it was built before it existed)
    added_neighbour: float = 0.0    # HybridConfig.added_neighbour (0: the rule before it existed)
    added_boost: float = 0.0        # HybridConfig.added_boost (0: before it existed)

    @classmethod
    def load(cls, run_dir: str | Path, name: str = "hybrid") -> "HybridScorer":
        folder = Path(run_dir) / name
        if not (folder / "scorer.json").is_file():
            raise HybridError(f"{run_dir} has no hybrid item vectors (RUN/hybrid/scorer.json): hybrid search needs the "
                              f"pipeline stage 'hybrid' (python train.py --config ... ; split.scorer_queries > 0)")
        info = json.loads((folder / "scorer.json").read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise HybridError(f"{folder}/scorer.json has format version {info.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}: rebuild it (pipeline stage hybrid)")
        vectors = ItemVectorSet.load(folder, info["storage"], info["dim"])
        return cls(vectors, float(info["weight"]), info["levels"], int(info["candidates"]), info,
                   int(info.get("dense_candidates", 0)), info.get("added_levels", "trained"),
                   float(info.get("added_neighbour", 0.0)), float(info.get("added_boost", 0.0)))

    def n_levels(self, identifier_length: int) -> int:
        return identifier_length - 1 if self.levels == "prefix" else identifier_length


OFFSETS_FORMAT = 1


def read_offsets(path: str | Path, *, folds: bool = False):
    """Item id -> log-prob offset of the items folded in after training (RUN/model/folded_offsets.json,
    written by ``train.py fold``); {} when the file does not exist (no fold fitted one). ``folds``: return
    (offsets, fold -> the record of its fit)."""
    path = Path(path)
    if not path.is_file():
        return ({}, {}) if folds else {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HybridError(f"{path} is not readable JSON ({exc}); restore it from the fold that wrote it "
                          f"(RUN/fold/<n>/gate.json records each fold's offset)") from None
    offsets = data.get("offsets") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format_version") != OFFSETS_FORMAT or not isinstance(offsets, dict):
        raise HybridError(f"{path} must hold {{'format_version': {OFFSETS_FORMAT}, 'offsets': {{item_id: offset}}}}")
    bad = [k for k, v in offsets.items() if isinstance(v, bool) or not isinstance(v, (int, float))
           or not math.isfinite(v)]
    if bad:
        raise HybridError(f"{path}: the offsets of {len(bad)} item(s) are not finite numbers, e.g. {bad[:5]}")
    out = {str(k): float(v) for k, v in offsets.items()}
    return (out, dict(data.get("folds") or {})) if folds else out


def offsets_document(offsets: dict[str, float], folds: dict) -> dict:
    """The JSON document ``read_offsets`` reads: ``offsets`` (item id -> log-prob offset) and ``folds``
    (fold -> the record of its fit)."""
    bad = [k for k, v in offsets.items() if not math.isfinite(v)]
    if bad:
        raise HybridError(f"folded items' log-prob offsets must be finite, got {bad[:5]}")
    return {"format_version": OFFSETS_FORMAT, "offsets": {k: float(v) for k, v in offsets.items()}, "folds": folds}


def query_dim(model) -> int:
    """Dimension of the model's query vectors (``sentence_vectors`` of its last encoder layer)."""
    return model.config.d_model if model.encoder.bert is None else model.encoder.bert.config.hidden_size


def check_query_dim(scorer_dim: int, model) -> None:
    d = query_dim(model)
    if d != scorer_dim:
        raise HybridError(f"the hybrid item vectors have dimension {scorer_dim} but the model's encoder gives "
                          f"{d}-dimensional query vectors; rebuild RUN/hybrid (pipeline stage hybrid)")


@dataclass
class HybridHit:
    item_id: str
    score: float        # log-prob + w * cosine
    logprob: float      # log P(identifier levels | query)
    cosine: float
    source: str         # "generative" (beam search) | "dense" (trie item nearest the query vector, identifier
                        # scored teacher-forced) | "fallback" (added item, identifier scored teacher-forced)


SOURCES_OF_HITS = ("generative", "fallback", "dense")   # by search_merged's per-candidate source code


@dataclass
class FallbackItems:
    """Items served outside the trie (added after training): their ids, unit text-space vectors
    (n, d) and identifier token ids (n, L) from the fitted tokenizer."""
    ids: list[str]
    vectors: np.ndarray
    tokens: np.ndarray
    signatures: list[dict[str, float]] | None = None   # added_levels signature: per item, trained id -> weight

    def __post_init__(self):
        if len(self.ids):
            self.vectors = check_vectors(self.vectors, "fallback item vectors")
        if not (len(self.ids) == len(self.vectors) == len(self.tokens)):
            raise HybridError(f"fallback items: {len(self.ids)} ids, {len(self.vectors)} vectors, "
                              f"{len(self.tokens)} identifiers")


def search_merged(model, query_tokenizer, trie, table_ids: list[str], vocab, scorer: HybridScorer, queries: list[str],
                  num_beams: int, k: int, *, extra_vectors: dict | None = None, fallback: FallbackItems | None = None,
                  fallback_candidates: int | None = None, dense_pool: DensePool | None = None,
                  offsets: dict[str, float] | None = None) -> list[list[HybridHit]]:
    """Hybrid search of one query batch over both paths with ONE scorer.

    Generative candidates: the beam search's top-``num_beams`` (trie rows -> ``table_ids``). Fallback
    candidates: the ``fallback_candidates`` (default ``num_beams``) added items nearest the query
    vector, their identifiers scored teacher-forced by the same model up to their trained depth, the
    levels past it at the best per-level log-prob of the query's generative candidates (``untrained_completion``;
    ``scorer.added_levels == "none"``: no level counts as trained, so an added item scores the best
    candidate's log-prob and only the cosine tells them apart). Every candidate's score is
    log P(its identifier levels | q) + w * cos(q, item vector); the vector of a trie item comes from
    the stored set, or from ``extra_vectors`` (id -> unit vector) for items trained in later (folded).
    Dense candidates (``scorer.dense_candidates`` D > 0, with ``dense_pool``: every trie item with a vector,
    stored or built later, ``DensePool.build``): the D items of the trie nearest the query vector that the
    beam search did not return, their whole identifier scored teacher-forced
    (every level of a trie item was trained), source "dense". ``offsets`` (item id -> log-prob offset, items
    folded in later, ``read_offsets``) are added to those items' log-probs wherever they are candidates,
    before an added item's log-prob is taken from them. ``scorer.added_boost`` is added to every added item's
    log-prob last."""
    import torch

    from ace.model.decoding import constrained_beam_search, score_identifiers

    check_query_dim(scorer.vectors.dim, model)
    extra_vectors = extra_vectors or {}
    device = next(model.parameters()).device
    enc = query_tokenizer(queries, max_length=model.config.max_query_length)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    state: dict = {}
    levels = scorer.n_levels(vocab.length)
    if trie is not None:
        rows, full = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=num_beams, top_k=num_beams,
                                             state=state)
        lp = (state["prefix_scores"] if scorer.levels == "prefix" else full).numpy().astype(np.float64)
        rows = rows.numpy()
    else:  # no item left on the generative path: the encoder pass only, for the fallback items' scores
        state = encoder_state(model, ids, mask)
        rows, lp = np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0))
    qv = sentence_vectors(state["last_hidden"], mask)
    Q, B = rows.shape
    cand_ids = [[table_ids[r] if r >= 0 else None for r in row] for row in rows.tolist()]
    stored = np.full((Q, B), -1, dtype=np.int64)
    cos = np.zeros((Q, B))
    for i, row in enumerate(cand_ids):
        for j, iid in enumerate(row):
            if iid is None:
                continue
            r = scorer.vectors.row.get(iid)
            if r is not None:
                stored[i, j] = r
            elif iid in extra_vectors:
                cos[i, j] = float(extra_vectors[iid] @ qv[i])
            else:
                raise HybridError(f"no hybrid item vector for generative item {iid!r}")
    cos = np.where(stored >= 0, scorer.vectors.cosine(qv, stored), cos)
    src = np.zeros((Q, B), dtype=np.int8)
    if scorer.dense_candidates and trie is not None:
        if dense_pool is None:
            raise HybridError("dense candidates need the pool of trie items with vectors (dense_pool)")
        dpos, dlp, dcos = pool_candidates(model, state, trie, vocab, dense_pool, qv, dense_pool.positions(cand_ids),
                                          scorer.dense_candidates, levels)
        cand_ids = [row + [dense_pool.ids[j] if j >= 0 else None for j in drow]
                    for row, drow in zip(cand_ids, dpos.tolist())]
        lp = np.concatenate([lp, dlp], 1)
        cos = np.concatenate([cos, dcos], 1)
        src = np.concatenate([src, np.full(dpos.shape, 2, dtype=np.int8)], 1)
        rows = np.concatenate([rows, dpos], 1)                 # (only its -1 pads count below)
        stored = np.concatenate([stored, np.where(dpos >= 0, dense_pool.stored[np.maximum(dpos, 0)], -1)], 1)
    if offsets:
        lp = lp + np.array([[offsets.get(iid, 0.0) if iid is not None else 0.0 for iid in row] for row in cand_ids],
                           dtype=np.float64).reshape(lp.shape)
    if fallback is not None and len(fallback.ids):
        F = min(fallback_candidates or num_beams, len(fallback.ids))
        fcos_all = qv @ fallback.vectors.T                                                 # (Q, n)
        top = np.argsort(-fcos_all, axis=1, kind="stable")[:, :F]
        if scorer.added_levels == "signature" and trie is not None:
            if fallback.signatures is None:
                raise HybridError("hybrid.added_levels signature needs the added items' signatures (FallbackItems)")
            flp = signature_completion(lp, cand_ids, fallback.signatures, top)
        elif scorer.added_levels in ("none", "signature"):   # no level counts as trained: no teacher-forced pass
            sim = np.zeros((Q, F, len(cand_ids[0]) if Q else 0))
            if scorer.added_neighbour > 0:   # (with 0 the similarity does not count)
                sim = np.einsum("qfd,qbd->qfb", fallback.vectors[top],
                                candidate_vectors(stored, cand_ids, scorer.vectors, extra_vectors))
            flp = neighbour_completion(lp, rows, sim, scorer.added_neighbour * scorer.weight)
        else:
            toks = torch.as_tensor(fallback.tokens[top], dtype=torch.long, device=device)   # (Q, F, L)
            flp = score_identifiers(model, state["memory"], state["mask"], toks, levels, query=state["query"],
                                    per_level=True).cpu().numpy().astype(np.float64)                # (Q, F, levels)
            depth = trained_depth(trie, vocab.decode(fallback.tokens[top]), levels)
            flp = untrained_completion(flp, depth, lp, rows)
        flp = flp + scorer.added_boost
        cand_ids = [row + [fallback.ids[t] for t in trow] for row, trow in zip(cand_ids, top.tolist())]
        lp = np.concatenate([lp, flp], 1)
        cos = np.concatenate([cos, np.take_along_axis(fcos_all, top, 1)], 1)
        src = np.concatenate([src, np.ones((Q, F), dtype=np.int8)], 1)
        rows = np.concatenate([rows, np.zeros((Q, F), dtype=np.int64)], 1)
    order, score = rerank_order(rows, lp, cos, scorer.weight)
    out = []
    for i in range(Q):
        hits = []
        for j in order[i]:
            if len(hits) == k or not np.isfinite(score[i, j]):
                break
            hits.append(HybridHit(cand_ids[i][j], float(score[i, j]), float(lp[i, j]), float(cos[i, j]),
                                  SOURCES_OF_HITS[src[i, j]]))
        out.append(hits)
    return out


class HybridIndex:
    """A retriever's hybrid state: the run's fitted scorer, plus text-space vectors of the items that
    came after training (added: served from outside the trie; folded: trained in later), built from
    their texts by the model's encoder on first use and cached per item id."""

    def __init__(self, scorer: HybridScorer, model, query_tokenizer, *, offsets: dict[str, float] | None = None):
        check_query_dim(scorer.vectors.dim, model)
        self.scorer, self.model, self.query_tokenizer = scorer, model, query_tokenizer
        self.offsets = dict(offsets or {})     # folded item id -> log-prob offset (``read_offsets``)
        self._vectors: dict[str, np.ndarray] = {}
        self._signatures: dict[str, dict[str, float]] = {}     # added item id -> signature (``signatures``)
        self._signature_trie, self._signature_items = None, frozenset()   # what the signatures were made against

    @classmethod
    def load(cls, run_dir, model, query_tokenizer, *, offsets: dict[str, float] | None = None) -> "HybridIndex":
        return cls(HybridScorer.load(run_dir), model, query_tokenizer, offsets=offsets)

    def vectors(self, items) -> dict[str, np.ndarray]:
        """id -> unit vector of each CorpusItem (its description and captions, as the scorer's item vectors)."""
        todo = [it for it in items if it.item_id not in self._vectors]
        if todo:
            source = self.scorer.info.get("item_vectors", "doc_plus_queries")
            groups = [item_texts(it.description(), list(it.captions), source) for it in todo]
            vecs = mean_vectors(groups, lambda t: encode_texts(self.model, self.query_tokenizer, t),
                                [it.item_id for it in todo])
            self._vectors.update(zip([it.item_id for it in todo], vecs))
        return {it.item_id: self._vectors[it.item_id] for it in items}

    def signatures(self, items, *, trie, table_ids: list[str], vocab) -> list[dict[str, float]]:
        """``item_signatures`` of each CorpusItem (its description and captions) against ``trie``, the whole
        generative path (not one modality's; its leaves are rows of ``table_ids``). Made once per item and
        kept while the generative items stay the same: adds and modality filters keep them, a fold or a
        deleted trained item (another set of leaves) makes them anew."""
        cache = self._signatures
        if trie is not self._signature_trie:      # a rebuilt trie: compare what it holds
            leaves = trie.leaf_item[trie.leaf_item >= 0].tolist()
            now = frozenset(table_ids[r] for r in leaves)
            if now != self._signature_items:
                cache = self._signatures = {}
            self._signature_trie, self._signature_items = trie, now
        todo = [it for it in items if it.item_id not in cache]
        if todo:
            source = self.scorer.info.get("item_vectors", "doc_plus_queries")
            texts = [item_texts(it.description(), list(it.captions), source) for it in todo]
            sigs = item_signatures(self.model, self.query_tokenizer, trie, table_ids, vocab, texts,
                                   self.scorer.candidates, self.scorer.levels)
            cache.update(zip([it.item_id for it in todo], sigs))
        return [cache[it.item_id] for it in items]

    def search(self, queries: list[str], k: int, num_beams: int, *, trie, table_ids: list[str], vocab,
               later_items, fallback_items, fallback_tokens: np.ndarray, batch_size: int = 100,
               table_codes: np.ndarray | None = None, generative_trie=None) -> list[list[HybridHit]]:
        """``search_merged`` over query batches. ``later_items``: CorpusItems added/folded after training
        that may appear (trie or fallback); ``fallback_items`` (in ``fallback_tokens`` order): the
        added ones served outside the trie; ``trie`` None = no generative items; ``table_codes`` (rows of
        ``table_ids``): identifiers, needed by dense candidates; ``generative_trie``: the whole generative
        path when ``trie`` is one modality's (``added_levels: signature``; default ``trie``)."""
        extra = self.vectors([it for it in later_items if it.item_id not in self.scorer.vectors.row])
        pool = None
        if self.scorer.dense_candidates and table_codes is not None:   # every trie item, folded ones too
            pool = DensePool.build(self.scorer.vectors, table_ids, table_codes, extra,
                                   exclude=[it.item_id for it in fallback_items])
        fb = None
        if fallback_items:
            vec = self.vectors(fallback_items)
            whole = trie if generative_trie is None else generative_trie
            sigs = (self.signatures(fallback_items, trie=whole, table_ids=table_ids, vocab=vocab)
                    if self.scorer.added_levels == "signature" and trie is not None else None)
            fb = FallbackItems([it.item_id for it in fallback_items],
                               np.stack([vec[it.item_id] for it in fallback_items]), fallback_tokens, sigs)
        out: list[list[HybridHit]] = []
        for s in range(0, len(queries), batch_size):
            out += search_merged(self.model, self.query_tokenizer, trie, table_ids, vocab, self.scorer,
                                 queries[s:s + batch_size], num_beams, k, extra_vectors=extra, fallback=fb,
                                 dense_pool=pool, offsets=self.offsets)
        return out
