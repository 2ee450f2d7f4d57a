"""A trained run, loaded for search: text queries -> ranked items, by constrained identifier decoding,
plus a dynamic index of items added after training.

    retriever = Retriever.from_run("runs/demo")
    hits = retriever.search(["a red circle on grass"], k=5)   # list (per query) of SearchHit
    retriever.add_items([CorpusItem("new1", "image", media="new/1.png", captions=["..."])])
    retriever.delete_items(["img_0003"])

This is what evaluation, the benchmarks and the HTTP server call. The generative path computes no
query-item similarity: items come from beam search over the identifier trie, scored by sequence
log-prob. Items added after training are served by the fallback index (``ace/newitems/index.py``: query
tower -> hash codes -> Hamming ANN -> cosine re-rank) until ``train.py fold`` moves them into the
model; ``search`` merges both paths with the run's calibration, and every hit names its source.

State, rebuilt on every load from RUN/identifiers, RUN/fallback and RUN/store.sqlite:
- identifiers: the trained items' plus every stored item's (restored unchanged, u never reused);
- the generative trie: trained + folded items, minus deleted ones;
- the fallback index: stored items with source "added" that are active.
Every ``add_items``/``delete_items`` batch is one store transaction (``store.url``: RUN/store.sqlite, or
a PostgreSQL database shared by replicas), committed before the call returns and before the in-memory
indexes change: acknowledged = durable. Each write first takes the store's write lock and catches up
with what other processes (``python -m ace.serving.items``, another replica) committed; ``refresh()``
catches up between writes (a serving replica calls it every poll, ``ace/serving/replica.py``), and
``reload()`` swaps in a new model (after ``train.py fold``) while the old one serves.

``modality``, ``k`` and ``num_beams`` are one value for all queries or one per query: a mixed batch
shares one beam search (each query in its own modality's trie, own beam width, cut to its own k).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ace.arrays import resolve_device, unit_rows
from ace.data.corpus import MODALITIES, Corpus, CorpusItem
from ace.model.decoding import quantize_dynamic_int8, search_texts
from ace.model.modeling import AceModel
from ace.model.tokens import IdentifierVocab, QueryTokenizer
from ace.newitems.calibration import Calibration, load_calibration, merge_rankings
from ace.newitems.hybrid import HybridError, HybridIndex, read_offsets
from ace.newitems.index import FallbackIndex
from ace.newitems.query_tower import run_text_tower
from ace.run_folder import RunPaths, load_run_corpus, load_run_embeddings, model_version, read_encoder_config
from ace.serving.store import StoreError, resolve_store_url, store_backend
from ace.serving.catalog import CatalogRetired, ItemCatalog
from ace.serving.errors import (ItemConflictError, ItemNotFoundError, RetrieverError,  # noqa: F401 (API)
                                SearchModeUnavailableError, WriterLockError)
from ace.serving import per_query
from identifiers import FlatTrie, SemanticIdTokenizer

log = logging.getLogger("ace.serving.retriever")


@dataclass
class SearchHit:
    item_id: str
    modality: str
    score: float                      # generative log-probability, fallback cosine, or calibrated probability (search)
    identifier: tuple[int, ...]
    source: str = "generative"        # "generative" | "fallback" | "dense" (hybrid's nearest trie items): the path that found the item
    raw_score: float | None = None    # in merged results: the source's own score (hybrid: the log-prob)
    mode: str = "generative"          # the search mode that produced ``score`` (see Retriever.search)
    cosine: float | None = None       # hybrid mode: cosine(query vector, item vector) in the fused score


SEARCH_MODES = ("auto", "hybrid", "merged", "generative", "fallback")


class Retriever:
    mixed_modality_search = True   # search(modality=[...]) takes one filter per query (the server batches them)
    mixed_beam_search = True       # search(k=[...], num_beams=[...]) too: one model call for mixed k and beams

    def __init__(self, *, model: AceModel, query_tokenizer: QueryTokenizer, vocab: IdentifierVocab,
                 id_tokenizer: SemanticIdTokenizer, corpus: Corpus, default_beams: int = 10,
                 run_dir: Path | None = None, fallback: FallbackIndex | None = None,
                 calibration: Calibration | None = None, store_url: str | None = None):
        if vocab.level_sizes != list(id_tokenizer.level_sizes):
            raise RetrieverError(f"identifier vocabulary {vocab.level_sizes} does not match the identifier "
                                 f"tokenizer's levels {id_tokenizer.level_sizes}")
        if (fallback is None) != (calibration is None):
            raise RetrieverError("a fallback index needs its calibration (and vice versa)")
        self.model = model.eval()
        self.query_tokenizer = query_tokenizer
        self.vocab = vocab
        self.id_tokenizer = id_tokenizer
        self.corpus = corpus
        self.default_beams = default_beams
        self.run_dir = run_dir
        self.fallback, self.calibration = fallback, calibration
        self.device = next(model.parameters()).device
        self._trained_vectors: tuple[dict[str, int], np.ndarray] | None = None  # RUN/embeddings.npy, lazily
        self._tries: dict[str | None, FlatTrie | None] = {}
        self._forests: dict[tuple, tuple[FlatTrie, dict]] = {}   # several modalities' tries in one, with roots
        self._lock = threading.Lock()                 # guards the trie cache
        self._state = threading.RLock()               # searches vs add/delete (rows shift on delete)
        self.hybrid: HybridIndex | None = None         # RUN/hybrid (ace/newitems/hybrid.py): the fused scorer
        self.catalog = ItemCatalog(corpus=corpus, id_tokenizer=id_tokenizer, fallback=fallback, run_dir=run_dir,
                                   state=self._state, on_change=self.invalidate_tries,
                                   store_url=store_url or (resolve_store_url(run_dir) if run_dir is not None else None))
        self.model_fold: int | None = None            # the store's fold marker when this model was loaded
        self.model_version: str | None = None          # content hash of RUN/model as loaded (run_folder.model_version)
        self._load_args: dict = {}                     # from_run's arguments, for reload()

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | None = None, quantize: bool = False,
                 default_beams: int = 10, fallback: bool = True, text_encoder=None,
                 store_url: str | None = None, encoder_engine: str = "torch") -> "Retriever":
        """Load model, tokenizers, identifiers and corpus of a run folder written by train.py, then
        RUN/fallback (unless ``fallback=False``) and the items added/deleted since (the item store:
        ``store_url``, else $ACE_STORE_URL, else RUN/store.sqlite).

        ``text_encoder``: the fallback query tower's frozen text encoder, when already loaded.
        ``encoder_engine``: "torch", or "ort-fp32" / "ort-int8": the query encoder (a pretrained BERT) run by
        ONNX Runtime on the CPU (``ace.model.onnx_encoder``; exported once into RUN/cache/onnx).
        """
        run_dir = Path(run_dir)
        paths = RunPaths(run_dir)
        missing = paths.missing(RunPaths.TRAINED)
        if missing:
            raise RetrieverError(f"{run_dir} is not a trained run: missing {', '.join(missing)} "
                                 f"(run `python train.py --config ...` with run_dir={run_dir} first)")
        device = resolve_device(device, error=RetrieverError)
        version = model_version(run_dir)  # before loading: a fold swapping RUN/model meanwhile gives the older name
        model = AceModel.from_pretrained(str(paths.model)).to(device).eval()
        if encoder_engine != "torch":   # exported from the float encoder, before any quantisation
            from ace.model.onnx_encoder import OnnxEngineError, attach_ort_encoder
            try:
                model = attach_ort_encoder(model, encoder_engine, paths.cache / "onnx")
            except OnnxEngineError as exc:
                raise RetrieverError(f"encoder engine {encoder_engine!r}: {exc}") from None
        if quantize:
            if device != "cpu":
                raise RetrieverError("dynamic int8 quantisation is for CPU serving; use device='cpu'")
            model = quantize_dynamic_int8(model)   # the copy keeps an ONNX encoder's ``encode``
        corpus = load_run_corpus(run_dir)
        fb = cal = None
        if fallback and paths.fallback.is_dir():
            enc_cfg = read_encoder_config(run_dir)
            dual = run_text_tower(enc_cfg, {it.modality for it in corpus.items}) if enc_cfg is not None else None
            fb = FallbackIndex.load(paths.fallback, text_encoder=None if dual else text_encoder, dual_encoder=dual)
            if len(fb):
                raise RetrieverError(f"{paths.fallback} holds {len(fb)} items; the saved fallback index must be "
                                     f"empty (added items live in store.sqlite)")
            cal = load_calibration(paths.fallback / RunPaths.CALIBRATION)
        try:
            url = resolve_store_url(run_dir, store_url)
            store_backend(url)
        except StoreError as exc:
            raise RetrieverError(str(exc)) from None
        out = cls(model=model, query_tokenizer=QueryTokenizer.load(paths.query_tokenizer),
                  vocab=IdentifierVocab.load(paths.identifier_vocab),
                  id_tokenizer=SemanticIdTokenizer.load(paths.identifiers, device="cpu"),
                  corpus=corpus, default_beams=default_beams, run_dir=run_dir, fallback=fb, calibration=cal,
                  store_url=url)
        out.model_version = version
        out._load_args = dict(device=device, quantize=quantize, default_beams=default_beams, fallback=fallback,
                              text_encoder=text_encoder, store_url=url, encoder_engine=encoder_engine)
        if paths.hybrid_scorer.is_file():
            try:
                out.hybrid = HybridIndex.load(run_dir, out.model, out.query_tokenizer,
                                              offsets=read_offsets(paths.folded_offsets))
            except HybridError as exc:
                raise RetrieverError(str(exc)) from None
        if out.catalog.has_store():
            out.catalog.load_store()
            out.model_fold = out.catalog.store_fold
        return out

    # ---- staying in step with other replicas ----------------------------------------------------
    def refresh(self) -> bool:
        """Apply what other processes committed to the item store since this one last read it; True when
        something changed. Cheap when nothing did (one read of the store's change sequence). A new model
        (after ``train.py fold``) is swapped in by ``ace.serving.replica.reload_retriever``."""
        return self.catalog.refresh()

    def close(self) -> None:
        """Release the item store and the writer lock."""
        self.catalog.close()

    # ---- tries ---------------------------------------------------------------------------
    def trie(self, modality: str | None = None) -> FlatTrie:
        """The flat trie of the generative path's live identifiers (trained + folded, minus deleted;
        added items are the fallback's), or of one modality's (so decoding filters by modality)."""
        trie = self._generative_trie(modality)
        if trie is None:
            raise RetrieverError(f"no items of modality '{modality}' on the generative path of this run"
                                 if modality else "no items left on the generative path of this run")
        return trie

    def _generative_trie(self, modality: str | None) -> FlatTrie | None:
        with self._lock:
            if modality not in self._tries:
                full = self.id_tokenizer.trie
                fb = self.fallback
                if modality is None and (fb is None or len(fb) == 0):
                    self._tries[None] = full.flat() if len(full) else None
                else:
                    rows = [r for r, i in enumerate(full.item_ids)
                            if (modality is None or self.catalog.modality.get(i) == modality) and (fb is None or i not in fb)]
                    self._tries[modality] = (FlatTrie.from_codes(np.asarray(full.codes)[rows], self.id_tokenizer.level_sizes,
                                                                 items=np.asarray(rows, dtype=np.int64)) if rows else None)
            return self._tries[modality]

    def _forest(self, modalities: tuple) -> tuple[FlatTrie, dict]:
        """The generative tries of several modalities side by side in one FlatTrie (``FlatTrie.forest``),
        and each modality's root node; raises for a modality without generative items."""
        with self._lock:
            cached = self._forests.get(modalities)
        if cached is None:
            forest, roots = FlatTrie.forest([self.trie(m) for m in modalities])
            cached = (forest, dict(zip(modalities, roots.tolist())))
            with self._lock:
                self._forests[modalities] = cached
        return cached

    def invalidate_tries(self) -> None:
        """Call after identifiers were added or removed."""
        with self._lock:
            self._tries.clear()
            self._forests.clear()

    # ---- search ----------------------------------------------------------------------------
    _check_queries = staticmethod(per_query.check_queries)
    _per_query = staticmethod(per_query.modalities)

    def _widths(self, k, num_beams, n: int) -> tuple[list[int], list[int]]:
        return per_query.widths(k, num_beams, n, self.default_beams)

    def search(self, queries: list[str], k: int | Sequence[int] = 10, num_beams: int | None | Sequence[int | None] = None,
               modality: str | None | Sequence[str | None] = None,
               *, batch_size: int = 100, progress: bool = False, mode: str | None = None) -> list[list[SearchHit]]:
        """Top-k items per query. While no item waits in the fallback index (none added, or all folded):
        the generative path alone (log-prob scores; no query-item similarity is computed). Otherwise
        generative and fallback results merged by calibrated probability of being the right item
        (``score``; ``raw_score`` keeps the source's own score), each hit naming its source. A cosine-scale
        calibration scores generative hits by the query tower's cosine to their item embeddings.
        ``modality``, ``k``, ``num_beams``: one value for all queries, or a list with one per query.

        ``mode`` (None = "auto"): ``hybrid`` (auto when the run has RUN/hybrid): generative and added
        items ranked by one score, identifier-prefix log-prob + w * cosine (``ace/newitems/hybrid.py``;
        ``raw_score`` = log-prob, ``cosine``); ``merged`` (auto otherwise): as above; ``generative`` /
        ``fallback``: one path. Every hit names its path (``source``) and the mode that scored it."""
        mode = mode or "auto"
        if mode not in SEARCH_MODES:
            raise RetrieverError(f"unknown search mode {mode!r}; known: {', '.join(SEARCH_MODES)}")
        if mode == "auto":
            mode = "hybrid" if self.hybrid is not None else "merged"
        if (np.ndim(k) or np.ndim(num_beams)) and mode in ("hybrid", "fallback"):  # one search per beam width
            return per_query.search_by_width(self.search, queries, k, num_beams, modality, self.default_beams,
                                             batch_size=batch_size, mode=mode)
        if mode == "hybrid":
            mods = self._per_query(modality, len(queries)) if not isinstance(queries, str) else [modality]
            if len(set(mods)) <= 1:
                return self.search_hybrid(queries, k, num_beams, mods[0] if mods else None, batch_size=batch_size)
            out: list = [None] * len(queries)
            for m in set(mods):  # one hybrid search per modality filter
                idx = [i for i, x in enumerate(mods) if x == m]
                for i, row in zip(idx, self.search_hybrid([queries[i] for i in idx], k, num_beams, m, batch_size=batch_size)):
                    out[i] = row
            return out
        if mode == "fallback":
            return self.search_fallback(queries, k, modality)
        if mode == "generative":
            return self.search_generative(queries, k, num_beams, modality, batch_size=batch_size, progress=progress)
        if self.calibration is None or self.fallback is None or len(self.fallback) == 0:
            return self.search_generative(queries, k, num_beams, modality, batch_size=batch_size, progress=progress)
        self._check_queries(queries, k)
        if not queries:
            return []
        mods = self._per_query(modality, len(queries))
        ks = self._widths(k, num_beams, len(queries))[0]
        cosine = self.calibration.scale == "cosine"
        qv = self.fallback.tower.encode(list(queries)) if cosine else None  # (Q, D), outside the lock
        with self._state:
            gen_mods = {m for m in set(mods) if self._generative_trie(m) is not None}
            gen: list[list[SearchHit]] = [[] for _ in queries]
            on_gen = [i for i, m in enumerate(mods) if m in gen_mods]
            if on_gen:
                found = self.search_generative([queries[i] for i in on_gen], per_query.pick(k, on_gen), per_query.pick(num_beams, on_gen),
                                               [mods[i] for i in on_gen], batch_size=batch_size, progress=progress)
                for i, hits in zip(on_gen, found):
                    gen[i] = hits
            fb = (self.search_fallback(queries, max(ks), mods, query_vectors=qv) if len(self.fallback)
                  else [[] for _ in queries])
            gen_cos = self._tower_cosines(qv, gen) if cosine else [None] * len(gen)
            out = []
            for g_row, f_row, g_cos, k_row in zip(gen, fb, gen_cos, ks):
                f_row = f_row[:k_row]
                hits = {("generative", h.item_id): h for h in g_row} | {("fallback", h.item_id): h for h in f_row}
                merged = merge_rankings([(h.item_id, h.score) for h in g_row], [(h.item_id, h.score) for h in f_row],
                                        self.calibration, k=k_row, generative_cosines=g_cos)
                out.append([SearchHit(m.item_id, hits[m.source, m.item_id].modality, m.score,
                                      hits[m.source, m.item_id].identifier, m.source, m.raw_score, "merged")
                            for m in merged])
            return out

    @torch.inference_mode()
    def search_hybrid(self, queries: list[str], k: int = 10, num_beams: int | None = None,
                      modality: str | None = None, *, batch_size: int = 100) -> list[list[SearchHit]]:
        """Hybrid mode (see ``search``): one fused score for generative and added items."""
        if self.hybrid is None:
            raise SearchModeUnavailableError(f"hybrid search needs the run's hybrid item vectors and weight (RUN/hybrid), which "
                                 f"{self.run_dir or 'this retriever'} does not have: run the pipeline stage 'hybrid' "
                                 f"(hybrid.enabled=true, split.scorer_queries > 0)")
        self._check_queries(queries, k)
        if modality is not None and modality not in MODALITIES:
            raise RetrieverError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
        if not queries:
            return []
        beams = max(int(num_beams or self.default_beams), k)
        cat = self.catalog
        with self._state:
            trie = self._generative_trie(modality)
            fb_ids = [i for i in cat.stored if self.fallback is not None and i in self.fallback
                      and (modality is None or cat.modality.get(i) == modality)]
            if trie is None and not fb_ids:
                self.trie(modality)  # raises the "no items" error
            tok = self.id_tokenizer
            codes_of = dict(zip(tok.trie.item_ids, np.asarray(tok.trie.codes)))
            tokens = self.vocab.encode(np.stack([codes_of[i] for i in fb_ids])) if fb_ids else np.zeros((0, 1))
            try:
                rows = self.hybrid.search(queries, k, beams, trie=trie, table_ids=tok.trie.item_ids, vocab=self.vocab,
                                          later_items=list(cat.stored.values()),
                                          fallback_items=[cat.stored[i] for i in fb_ids], fallback_tokens=tokens,
                                          batch_size=batch_size, table_codes=tok.trie.codes,
                                          generative_trie=self._generative_trie(None))
            except HybridError as exc:
                raise RetrieverError(str(exc)) from None
            return [[SearchHit(h.item_id, cat.modality.get(h.item_id, "unknown"), h.score,
                               tuple(int(c) for c in codes_of[h.item_id]), h.source, h.logprob, "hybrid", h.cosine)
                     for h in row] for row in rows]

    @torch.inference_mode()
    def search_generative(self, queries: list[str], k: int | Sequence[int] = 10,
                          num_beams: int | None | Sequence[int | None] = None,
                          modality: str | None | Sequence[str | None] = None, *, batch_size: int = 100,
                          progress: bool = False) -> list[list[SearchHit]]:
        """Top-k items per query by trie-constrained beam search (beams are raised to k when fewer).
        With one modality filter (or k, or num_beams) per query, queries of different modalities and k
        share each batched decode, each starting at its own modality's trie with its own beam width (the
        same results as separate calls). A query whose modality has no items on the generative path gets
        no hits."""
        self._check_queries(queries, k)
        if not queries:
            return []
        mods = self._per_query(modality, len(queries))
        ks, widths = self._widths(k, num_beams, len(queries))
        if len(set(ks)) == 1 and len(set(widths)) == 1:
            ks, widths = ks[0], widths[0]
        with self._state:
            live = {m for m in set(mods) if self._generative_trie(m) is not None}
            if len(live) < len(set(mods)):  # a modality without generative items: no hits for its queries
                out = [[] for _ in queries]
                on = [i for i, m in enumerate(mods) if m in live]
                found = self.search_generative([queries[i] for i in on], per_query.pick(k, on), per_query.pick(num_beams, on),
                                               [mods[i] for i in on], batch_size=batch_size, progress=progress) if on else []
                for i, hits in zip(on, found):
                    out[i] = hits
                return out
            uniq = tuple(sorted(set(mods), key=lambda m: (m is not None, m or "")))
            if len(uniq) == 1:
                trie, roots = self.trie(uniq[0]), None
            else:
                trie, root_of = self._forest(uniq)
                roots = np.asarray([root_of[m] for m in mods], dtype=np.int64)
            item_ids = self.id_tokenizer.trie.item_ids
            codes = np.asarray(self.id_tokenizer.trie.codes)
            rows, scores, _ = search_texts(self.model, self.query_tokenizer, queries, trie, self.vocab, num_beams=widths,
                                           top_k=ks, batch_size=batch_size, progress=progress, roots=roots)
            return [[SearchHit(item_ids[r], self.catalog.modality.get(item_ids[r], "unknown"), float(sc),
                               tuple(int(c) for c in codes[r]))
                     for r, sc in zip(r_row, s_row) if r >= 0]
                    for r_row, s_row in zip(rows, scores.astype(np.float64))]

    def _tower_cosines(self, query_vectors: np.ndarray, rows: list[list[SearchHit]]) -> list[list[float]]:
        """Per query, the cosine between its tower vector and each hit's item embedding."""
        if self._trained_vectors is None:
            if self.run_dir is None or not RunPaths(self.run_dir).embeddings.is_file():
                raise RetrieverError("a cosine-scale calibration needs the trained items' embeddings "
                                     "(RUN/embeddings.npy); this retriever has no run folder holding them")
            try:
                ids, emb = load_run_embeddings(self.run_dir)
            except ValueError as exc:
                raise RetrieverError(str(exc)) from None
            self._trained_vectors = ({iid: i for i, iid in enumerate(ids)}, unit_rows(emb))
        row, emb = self._trained_vectors
        qv = unit_rows(query_vectors)
        out = []
        for q, hits in zip(qv, rows):
            vecs = []
            for h in hits:
                if h.item_id in row:
                    vecs.append(emb[row[h.item_id]])
                elif h.item_id in self.catalog.stored and self.catalog.stored[h.item_id].embedding is not None:
                    vecs.append(unit_rows(self.catalog.stored[h.item_id].embedding))
                else:
                    raise RetrieverError(f"item {h.item_id!r} has no stored embedding to score it for merged search")
            out.append((np.stack(vecs) @ q).astype(np.float64).tolist() if vecs else [])  # (hits,)
        return out

    def search_fallback(self, queries: list[str], k: int = 10, modality: str | None | Sequence[str | None] = None, *,
                        query_vectors: np.ndarray | None = None) -> list[list[SearchHit]]:
        """Top-k added items per query from the fallback index alone (score = cosine after re-ranking).
        ``query_vectors``: the queries' tower vectors (Q, D) when already computed."""
        if self.fallback is None:
            raise RetrieverError("this run has no fallback index (RUN/fallback): run the pipeline's `fallback` stage")
        self._check_queries(queries, k)
        mods = self._per_query(modality, len(queries))
        if not queries:
            return []
        if len(self.fallback) == 0:
            return [[] for _ in queries]
        qv = (self.fallback.tower.encode(list(queries)) if query_vectors is None  # (Q, D); outside the lock
              else np.asarray(query_vectors))
        with self._state:
            n = len(self.fallback)
            if n == 0:
                return [[] for _ in queries]
            # a modality filter ranks up to 10k candidates (at least the re-rank pool) and keeps the first k
            filtered = any(m is not None for m in mods)
            want = min(k, n) if not filtered else min(n, max(10 * k, self.fallback.index.config.candidates))
            results = self.fallback.search_vectors(qv, k=want)
            tok = self.id_tokenizer
            out = []
            for row, modality in zip(results, mods):
                row = [(i, s) for i, s in row if modality is None or self.catalog.modality.get(i) == modality][:k]
                codes = tok.codes_of([i for i, _ in row]) if row else []
                out.append([SearchHit(i, self.catalog.modality.get(i, "unknown"), float(s), tuple(int(c) for c in cc), "fallback",
                                      mode="fallback")
                            for (i, s), cc in zip(row, codes)])
            return out

    @property
    def corpus_root(self) -> Path | None:
        return self.corpus.root

    # ---- the item lifecycle (ace/serving/catalog.py) --------------------------------------------
    def add_items(self, items: Sequence[CorpusItem]) -> list[tuple[int, ...]]:
        """Validate, embed, assign identifiers, store durably (one transaction), add to the fallback index.

        Returns each item's identifier (k, v1..vM, u). Searchable as soon as this returns.
        """
        while True:
            try:
                return self.catalog.add(items)
            except CatalogRetired:  # a model reload swapped the catalog while this write waited
                continue

    def delete_items(self, item_ids: Sequence[str]) -> int:
        """Delete items of any source, durably (one transaction); they are never returned again."""
        while True:
            try:
                return self.catalog.delete(item_ids)
            except CatalogRetired:
                continue

    def item(self, item_id: str) -> CorpusItem:
        return self.catalog.item(item_id)

    def is_deleted(self, item_id: str) -> bool:
        return self.catalog.is_deleted(item_id)

    def counts(self) -> dict:
        """Live items by source: generative (trained + folded), fallback (added), and deleted ones."""
        with self._state:
            n_fb = len(self.fallback) if self.fallback is not None else 0
            folded = sum(1 for i in self.catalog.stored if self.fallback is None or i not in self.fallback)
            return {"generative": len(self.id_tokenizer.trie) - n_fb, "fallback": n_fb, "folded": folded,
                    "deleted": len(self.catalog.deleted)}

    def info(self) -> dict:
        from identifiers import FORMAT_VERSION

        counts = self.counts()
        out = {"items": counts["generative"] + counts["fallback"], "corpus_items": len(self.corpus),
               "by_source": counts,
               "model_version": self.model_version, "model_fold": self.model_fold,
               "identifier_version": FORMAT_VERSION, "store": self.catalog.store_info(),
               "identifier_levels": list(self.id_tokenizer.level_sizes),
               "model": {"d_model": self.model.config.d_model, "fusion": self.model.config.fusion,
                         "parameters": sum(p.numel() for p in self.model.parameters())},
               "quarantined": self.catalog.quarantine_report()}
        if self.fallback is not None:
            out["fallback"] = {"bits": self.fallback.head.bits, "index": self.fallback.index.config.kind,
                               "tower": "dual" if self.fallback.tower.is_dual else "projected",
                               "bytes_per_item": self.fallback.bytes_per_item()}
        return out
