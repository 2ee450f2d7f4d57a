"""A trained run, loaded for search: text queries -> ranked items, by constrained identifier decoding.

    retriever = Retriever.from_run("runs/demo")
    hits = retriever.search(["a red circle on grass"], k=5)   # list (per query) of SearchHit

This is what evaluation, the benchmarks and the HTTP server call. No query-item similarity is
computed: items come from beam search over the identifier trie, scored by sequence log-prob.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ace.corpus import Corpus, CorpusItem
from ace.decoding import constrained_beam_search, quantize_dynamic_int8
from ace.modeling import AceModel
from ace.run_folder import load_run_corpus
from ace.tokens import IdentifierVocab, QueryTokenizer
from identifiers import FlatTrie, SemanticIdTokenizer


class RetrieverError(ValueError):
    """A run folder is incomplete, or a search request is malformed; the message names the problem."""


@dataclass
class SearchHit:
    item_id: str
    modality: str
    score: float                      # identifier log-probability (generative) or calibrated score
    identifier: tuple[int, ...]
    source: str = "generative"        # "generative" | "fallback"


class Retriever:
    def __init__(self, *, model: AceModel, query_tokenizer: QueryTokenizer, vocab: IdentifierVocab,
                 id_tokenizer: SemanticIdTokenizer, corpus: Corpus, default_beams: int = 10,
                 run_dir: Path | None = None):
        if vocab.level_sizes != list(id_tokenizer.level_sizes):
            raise RetrieverError(f"identifier vocabulary {vocab.level_sizes} does not match the identifier "
                                 f"tokenizer's levels {id_tokenizer.level_sizes}")
        self.model = model.eval()
        self.query_tokenizer = query_tokenizer
        self.vocab = vocab
        self.id_tokenizer = id_tokenizer
        self.corpus = corpus
        self.default_beams = default_beams
        self.run_dir = run_dir
        self.device = next(model.parameters()).device
        self._modality = {it.item_id: it.modality for it in corpus.items}
        self._tries: dict[str | None, FlatTrie] = {}
        self._lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | None = None, quantize: bool = False,
                 default_beams: int = 10) -> "Retriever":
        """Load model, tokenizers, identifiers and corpus of a run folder written by train.py."""
        run_dir = Path(run_dir)
        needed = ["model", "query_tokenizer", "identifier_vocab.json", "identifiers", "corpus.jsonl"]
        missing = [n for n in needed if not (run_dir / n).exists()]
        if missing:
            raise RetrieverError(f"{run_dir} is not a trained run: missing {', '.join(missing)} "
                                 f"(run `python train.py --config ...` with run_dir={run_dir} first)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AceModel.from_pretrained(str(run_dir / "model")).to(device).eval()
        if quantize:
            if device != "cpu":
                raise RetrieverError("dynamic int8 quantisation is for CPU serving; use device='cpu'")
            model = quantize_dynamic_int8(model)
        return cls(model=model, query_tokenizer=QueryTokenizer.load(run_dir / "query_tokenizer"),
                   vocab=IdentifierVocab.load(run_dir / "identifier_vocab.json"),
                   id_tokenizer=SemanticIdTokenizer.load(run_dir / "identifiers", device="cpu"),
                   corpus=load_run_corpus(run_dir),
                   default_beams=default_beams, run_dir=run_dir)

    # ---- tries -----------------------------------------------------------------------------
    def trie(self, modality: str | None = None) -> FlatTrie:
        """The flat trie of all live identifiers, or of one modality's (so decoding filters by modality)."""
        with self._lock:
            if modality not in self._tries:
                full = self.id_tokenizer.trie
                if modality is None:
                    self._tries[None] = full.flat()
                else:
                    rows = [r for r, i in enumerate(full.item_ids) if self._modality.get(i) == modality]
                    if not rows:
                        raise RetrieverError(f"no items of modality '{modality}' in this run")
                    codes = np.asarray(full.codes)[rows]
                    self._tries[modality] = FlatTrie.from_codes(codes, self.id_tokenizer.level_sizes,
                                                                items=np.asarray(rows, dtype=np.int64))
            return self._tries[modality]

    def invalidate_tries(self) -> None:
        """Call after identifiers were added or removed."""
        with self._lock:
            self._tries.clear()

    # ---- search ----------------------------------------------------------------------------
    @torch.inference_mode()
    def search(self, queries: list[str], k: int = 10, num_beams: int | None = None, modality: str | None = None,
               *, batch_size: int = 100, progress: bool = False) -> list[list[SearchHit]]:
        """Top-k items per query by trie-constrained beam search (beams are raised to k when fewer)."""
        if isinstance(queries, str):
            raise RetrieverError("search() takes a list of query strings, not a single string")
        if not queries:
            return []
        if k < 1:
            raise RetrieverError(f"k must be >= 1, got {k}")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise RetrieverError(f"query {i} is empty")
        beams = max(int(num_beams or self.default_beams), k)
        trie = self.trie(modality)
        item_ids = self.id_tokenizer.trie.item_ids
        codes = np.asarray(self.id_tokenizer.trie.codes)
        out: list[list[SearchHit]] = []
        starts = range(0, len(queries), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="search", unit="batch")
        max_len = self.model.config.max_query_length
        for s in starts:
            enc = self.query_tokenizer(queries[s:s + batch_size], max_length=max_len)
            rows, scores = constrained_beam_search(self.model, enc.input_ids.to(self.device),
                                                   enc.attention_mask.to(self.device), trie, self.vocab,
                                                   num_beams=beams, top_k=k)
            rows, scores = np.asarray(rows), np.asarray(scores, dtype=np.float64)
            for r_row, s_row in zip(rows, scores):
                out.append([SearchHit(item_ids[r], self._modality.get(item_ids[r], "unknown"), float(sc),
                                      tuple(int(c) for c in codes[r]))
                            for r, sc in zip(r_row, s_row) if r >= 0])
        return out

    def _model_version(self) -> str | None:
        """Short hash of the saved model's config + weights file names and sizes (changes when retrained)."""
        if self.run_dir is None:
            return None
        import hashlib

        h = hashlib.sha256()
        for p in sorted((self.run_dir / "model").glob("*")):
            h.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
        return h.hexdigest()[:12]

    def item(self, item_id: str) -> CorpusItem:
        try:
            return self.corpus.get(item_id)
        except (KeyError, ValueError):
            raise RetrieverError(f"unknown item id {item_id!r}") from None

    def info(self) -> dict:
        from identifiers import FORMAT_VERSION

        return {"items": len(self.id_tokenizer.trie), "corpus_items": len(self.corpus),
                "model_version": self._model_version(), "identifier_version": FORMAT_VERSION,
                "identifier_levels": list(self.id_tokenizer.level_sizes),
                "model": {"d_model": self.model.config.d_model, "fusion": self.model.config.fusion,
                          "parameters": sum(p.numel() for p in self.model.parameters())},
                "run_dir": str(self.run_dir) if self.run_dir else None}
