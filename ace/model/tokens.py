"""Token vocabularies of the retrieval model: query tokens in, identifier tokens out.

``IdentifierVocab`` gives every (level, code) of an identifier ``(k, v1..vM, u)`` its own token
(level-specific vocabularies: ``k=5`` and ``v1=5`` are different tokens) after the specials
PAD=0, BOS=1, EOS=2: ``token = offsets[level] + code``.

``QueryTokenizer`` turns query strings into padded id tensors, either with a SentencePiece model
trained on the training queries or with the tokenizer of a pretrained encoder (a local folder
loadable by ``transformers.AutoTokenizer``). Over-long queries are truncated to ``max_length``
by default (``truncation=True``); with ``truncation=False`` they raise ``QueryError``. Empty
(or whitespace-only) queries always raise ``QueryError``.
"""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3
VOCAB_FORMAT = 1
QUERY_TOKENIZER_FORMAT = 1


class QueryError(ValueError):
    """A query cannot be tokenized (empty, or too long under ``truncation=False``)."""


def _read_versioned(path: Path, what: str, version: int, keys: tuple[str, ...]) -> dict:
    """A saved JSON file with a ``format`` version and the given ``keys``; ValueError naming the file
    when it is corrupt, lacks a key, or has another format version."""
    try:
        data = json.loads(path.read_text())
        for key in ("format", *keys):
            data[key]  # KeyError when absent, TypeError when the file is not a mapping
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt {what} file {path}: {exc}") from None
    if data["format"] != version:
        raise ValueError(f"{what} {path} has format {data['format']}, this code reads {version}")
    return data


class IdentifierVocab:
    """One token per (level, code) plus PAD/BOS/EOS; ``token = offsets[level] + code``."""

    def __init__(self, level_sizes: Sequence[int]):
        sizes = [int(s) for s in level_sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"level_sizes must be a non-empty list of positive ints, got {list(level_sizes)}")
        self.level_sizes = sizes
        self.offsets = [NUM_SPECIAL + sum(sizes[:i]) for i in range(len(sizes))]
        self.vocab_size = NUM_SPECIAL + sum(sizes)
        self._offsets = np.asarray(self.offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)

    @property
    def length(self) -> int:
        """Number of tokens of an identifier (L = M + 2)."""
        return len(self.level_sizes)

    def level_range(self, level: int) -> tuple[int, int]:
        """Token id range [start, stop) of identifier level ``level``."""
        return self.offsets[level], self.offsets[level] + self.level_sizes[level]

    def _check(self, arr: np.ndarray, what: str) -> None:
        if arr.ndim < 1 or arr.shape[-1] != self.length:
            raise ValueError(f"{what} must have last dimension {self.length} (identifier length), got shape {arr.shape}")

    def encode(self, codes):
        """codes (..., L) -> token ids (..., L); numpy in, numpy out; torch in, torch out."""
        is_torch = isinstance(codes, torch.Tensor)
        arr = codes.detach().cpu().numpy() if is_torch else np.asarray(codes)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"identifier codes must be integers, got dtype {arr.dtype}")
        self._check(arr, "codes")
        bad = (arr < 0) | (arr >= self._sizes)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"code {int(arr[idx])} at {idx} is out of range for level {idx[-1]} "
                             f"(size {self.level_sizes[idx[-1]]})")
        out = arr.astype(np.int64) + self._offsets
        return torch.from_numpy(out).to(codes.device) if is_torch else out

    def decode(self, tokens):
        """token ids (..., L) -> codes (..., L); raises on specials or a token of the wrong level."""
        is_torch = isinstance(tokens, torch.Tensor)
        arr = tokens.detach().cpu().numpy() if is_torch else np.asarray(tokens)
        self._check(arr, "tokens")
        codes = arr.astype(np.int64) - self._offsets
        bad = (codes < 0) | (codes >= self._sizes)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"token {int(arr[idx])} at {idx} is not a level-{idx[-1]} identifier token "
                             f"(expected {self.level_range(idx[-1])})")
        return torch.from_numpy(codes).to(tokens.device) if is_torch else codes

    def decoder_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: labels [t1..tL] (B, L) -> decoder input [BOS, t1..t_{L-1}] (B, L)."""
        bos = torch.full_like(tokens[:, :1], BOS)
        return torch.cat([bos, tokens[:, :-1]], dim=1)

    def to_dict(self) -> dict:
        return {"format": VOCAB_FORMAT, "level_sizes": self.level_sizes}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "IdentifierVocab":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"identifier vocabulary file not found: {path}")
        return cls(_read_versioned(path, "identifier vocabulary", VOCAB_FORMAT, ("level_sizes",))["level_sizes"])

    def __eq__(self, other) -> bool:
        return isinstance(other, IdentifierVocab) and other.level_sizes == self.level_sizes

    def __repr__(self) -> str:
        return f"IdentifierVocab(level_sizes={self.level_sizes}, vocab_size={self.vocab_size})"


class QueryBatch(NamedTuple):
    input_ids: torch.Tensor       # (B, N) int64
    attention_mask: torch.Tensor  # (B, N) int64, 1 = real token


class QueryTokenizer:
    """Query strings -> padded (input_ids, attention_mask); SentencePiece or a pretrained tokenizer."""

    def __init__(self, *, kind: str, max_length: int = 32, truncation: bool = True,
                 sp_model: bytes | None = None, hf_tokenizer=None):
        if kind not in ("sentencepiece", "hf"):
            raise ValueError(f"unknown query tokenizer kind '{kind}' (expected 'sentencepiece' or 'hf')")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.kind, self.max_length, self.truncation = kind, int(max_length), bool(truncation)
        self._sp_bytes = sp_model
        self.hf = hf_tokenizer
        if kind == "sentencepiece":
            import sentencepiece as spm
            if sp_model is None:
                raise ValueError("a sentencepiece QueryTokenizer needs sp_model bytes")
            self.sp = spm.SentencePieceProcessor(model_proto=sp_model)
            self.pad_id = self.sp.pad_id()
        else:
            if hf_tokenizer is None:
                raise ValueError("an 'hf' QueryTokenizer needs hf_tokenizer")
            self.pad_id = hf_tokenizer.pad_token_id

    # ---- construction
    @classmethod
    def train(cls, texts: Sequence[str], *, vocab_size: int = 8000, model_type: str = "unigram",
              max_length: int = 32, truncation: bool = True) -> "QueryTokenizer":
        """Train SentencePiece on ``texts``; a vocab too large for a tiny corpus is capped (logged)."""
        import sentencepiece as spm
        texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise QueryError("cannot train a query tokenizer on an empty list of queries")
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got '{model_type}'")

        def _train(size: int) -> bytes:
            buf = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=buf, vocab_size=size, model_type=model_type,
                pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, character_coverage=1.0,
                normalization_rule_name="nmt_nfkc_cf", minloglevel=2, num_threads=1)
            return buf.getvalue()

        try:
            blob = _train(vocab_size)
        except RuntimeError as exc:
            m = re.search(r"<=\s*(\d+)", str(exc))
            if not m:
                raise
            capped = int(m.group(1))
            log.warning("query vocabulary of %d is too large for %d training queries; capped to %d",
                        vocab_size, len(texts), capped)
            blob = _train(capped)
        return cls(kind="sentencepiece", sp_model=blob, max_length=max_length, truncation=truncation)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, max_length: int = 32, truncation: bool = True) -> "QueryTokenizer":
        """Tokenizer of a pretrained encoder from a local folder (e.g. ace.data.encoders.minilm_path())."""
        from transformers import AutoTokenizer
        if not Path(path).is_dir():
            raise FileNotFoundError(f"pretrained tokenizer folder not found: {path}")
        return cls(kind="hf", hf_tokenizer=AutoTokenizer.from_pretrained(str(path)),
                   max_length=max_length, truncation=truncation)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() if self.kind == "sentencepiece" else len(self.hf)

    # ---- encoding
    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self.sp.encode(texts)
        return self.hf(texts, add_special_tokens=True, truncation=False)["input_ids"]

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> QueryBatch:
        """texts -> QueryBatch(input_ids (B, N), attention_mask (B, N)) with N <= max_length."""
        if isinstance(texts, str):
            raise TypeError("QueryTokenizer takes a list of strings, not a single string")
        texts = list(texts)
        if not texts:
            raise QueryError("no queries given (empty list)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise QueryError(f"query {i} is not a string: {t!r}")
            if not t.strip():
                raise QueryError(f"query {i} is empty")
        max_length = int(max_length or self.max_length)
        ids = self._ids(texts)
        out = []
        for i, seq in enumerate(ids):
            if not seq:
                raise QueryError(f"query {i} ({texts[i]!r}) has no tokens")
            if len(seq) > max_length:
                if not self.truncation:
                    raise QueryError(f"query {i} has {len(seq)} tokens, more than max_length={max_length} "
                                     f"(truncation is off)")
                seq = seq[:max_length - 1] + seq[-1:] if self.kind == "hf" else seq[:max_length]  # keep [SEP]
            out.append(seq)
        n = max(len(s) for s in out)
        input_ids = torch.full((len(out), n), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(out), n), dtype=torch.long)
        for i, seq in enumerate(out):
            input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, :len(seq)] = 1
        return QueryBatch(input_ids, attention_mask)

    # ---- persistence
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": QUERY_TOKENIZER_FORMAT, "kind": self.kind, "max_length": self.max_length,
                "truncation": self.truncation}
        if self.kind == "sentencepiece":
            (folder / "query_spm.model").write_bytes(self._sp_bytes)
        else:
            self.hf.save_pretrained(str(folder / "query_hf_tokenizer"))
        (folder / "query_tokenizer.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str | Path) -> "QueryTokenizer":
        folder = Path(folder)
        meta_path = folder / "query_tokenizer.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no query tokenizer in {folder} (missing query_tokenizer.json)")
        meta = _read_versioned(meta_path, "query tokenizer", QUERY_TOKENIZER_FORMAT, ("kind",))
        kind = meta["kind"]
        kw = dict(max_length=meta.get("max_length", 32), truncation=meta.get("truncation", True))
        if kind == "sentencepiece":
            model = folder / "query_spm.model"
            if not model.is_file():
                raise FileNotFoundError(f"query tokenizer model missing: {model}")
            try:
                return cls(kind=kind, sp_model=model.read_bytes(), **kw)
            except RuntimeError as exc:
                raise ValueError(f"corrupt SentencePiece model {model}: {exc}") from None
        return cls.from_pretrained(folder / "query_hf_tokenizer", **kw)
