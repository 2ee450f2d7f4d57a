"""Fallback index for items added after training: the path that serves them until ``train.py fold``.

    query text -> QueryTower -> HashHead -> faiss binary ANN (Hamming) -> float cosine re-rank

``FallbackIndex`` holds the items the generative model does not know yet (string item ids);
ace/newitems/calibration.py merges its results with the generative ones, and the pipeline's
``fallback`` stage (ace/pipeline/fallback_stage.py) trains and saves it as RUN/fallback.

    fb = FallbackIndex(tower=tower, head=head)
    fb.add(["img_9001"], emb)                 # searchable at once
    fb.search(["a red bus"], k=10)            # [[("img_9001", 0.71), ...]]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ace.newitems.hashing import BinaryIndex, BinaryIndexConfig, HashConfig, HashHead, HashingError, check_embeddings
from ace.newitems.query_tower import QueryTower, QueryTowerConfig, TextTower

FORMAT_VERSION = 1


class FallbackError(ValueError):
    """Bad input to the fallback index or merge (unknown/duplicate ids, NaN, shapes, bad files)."""


@dataclass
class FallbackConfig:
    """Everything the fallback path needs: query tower, hash head, binary index, calibration (YAML section)."""
    tower: QueryTowerConfig = field(default_factory=QueryTowerConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    index: BinaryIndexConfig = field(default_factory=BinaryIndexConfig)
    enabled: bool = True               # the pipeline's `fallback` stage builds RUN/fallback
    calibration_queries: int = 200     # training queries held out of the query tower, used to fit the calibration
    calibration_k: int = 10            # results per source and calibration query

    def __post_init__(self):
        if self.calibration_queries < 2 or self.calibration_k < 1:
            raise ValueError(f"calibration_queries must be >= 2 and calibration_k >= 1, "
                             f"got {self.calibration_queries} and {self.calibration_k}")


class FallbackIndex:
    """Dynamic index of string item ids: query tower -> hash head -> binary ANN -> float re-rank."""

    def __init__(self, *, tower: QueryTower, head: HashHead, config: BinaryIndexConfig | None = None):
        if tower.item_dim is not None and tower.item_dim != head.dim:
            raise FallbackError(f"query tower outputs {tower.item_dim}-d vectors but the hash head takes {head.dim}-d")
        self.tower, self.head = tower, head
        self.index = BinaryIndex(bits=head.bits, dim=head.dim, config=config)
        self.id_of: dict[str, int] = {}   # item id -> int64 faiss id
        self.item_of: dict[int, str] = {}  # int64 faiss id -> item id
        self.next_id = 0

    @classmethod
    def train(cls, *, config: FallbackConfig, pairs: Sequence[tuple[str, str]], item_ids: Sequence[str],
              item_embeddings: np.ndarray, text_encoder: TextTower | None = None,
              dual_encoder: TextTower | None = None, progress: bool = False) -> "FallbackIndex":
        """Train the query tower on (item_id, query) pairs (unless a dual encoder's text tower is given)
        and the hash head on the item embeddings + projected queries; returns an empty index."""
        dim = np.asarray(item_embeddings).shape[-1]
        texts = [q for _, q in pairs]
        if dual_encoder is not None:
            tower = QueryTower(config=config.tower, dual_encoder=dual_encoder, item_dim=dim)
            queries = tower.encode(texts) if texts else None
        else:
            tower = QueryTower(config=config.tower, text_encoder=text_encoder, item_dim=dim)
            text_emb = tower.embed_text(texts)  # frozen embeddings computed once
            tower.fit(pairs, item_ids, item_embeddings, text_emb=text_emb, progress=progress)
            queries = tower.project(text_emb)
        head = HashHead(dim=dim, config=config.hash)
        try:
            head.fit(item_embeddings, extra=queries, progress=progress)
        except HashingError as exc:
            raise FallbackError(str(exc)) from None
        return cls(tower=tower, head=head, config=config.index)

    def __len__(self) -> int:
        return len(self.id_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.id_of

    @property
    def item_ids(self) -> list[str]:
        return list(self.id_of)

    def add(self, item_ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Add items (searchable at once). Duplicate ids, NaN embeddings and wrong dims are errors."""
        if isinstance(item_ids, str):
            raise FallbackError("item_ids must be a list of ids, not a single string")
        item_ids = list(item_ids)
        try:
            emb = check_embeddings(embeddings, self.head.dim, "item embeddings")
        except HashingError as exc:
            raise FallbackError(str(exc)) from None
        if len(emb) != len(item_ids):
            raise FallbackError(f"{len(item_ids)} item ids but {len(emb)} embeddings")
        if len(set(item_ids)) != len(item_ids):
            raise FallbackError("duplicate item ids within one add()")
        dup = [i for i in item_ids if i in self.id_of]
        if dup:
            raise FallbackError(f"items already in the fallback index: {dup[:5]}")
        ids = np.arange(self.next_id, self.next_id + len(item_ids), dtype=np.int64)
        try:
            self.index.add(ids, self.head.encode(emb), emb)
        except HashingError as exc:
            raise FallbackError(str(exc)) from None
        self.next_id += len(item_ids)
        for item_id, i in zip(item_ids, ids.tolist()):
            self.id_of[item_id] = i
            self.item_of[i] = item_id

    def remove(self, item_ids: Sequence[str]) -> None:
        """Remove items; they never come back from search. Unknown ids are an error."""
        if isinstance(item_ids, str):
            raise FallbackError("item_ids must be a list of ids, not a single string")
        item_ids = list(item_ids)
        if len(set(item_ids)) != len(item_ids):
            raise FallbackError("duplicate item ids within one remove()")
        unknown = [i for i in item_ids if i not in self.id_of]
        if unknown:
            raise FallbackError(f"cannot remove items not in the fallback index: {unknown[:5]}")
        ids = np.array([self.id_of[i] for i in item_ids], dtype=np.int64)
        self.index.remove(ids)
        for item_id, i in zip(item_ids, ids.tolist()):
            del self.id_of[item_id]
            del self.item_of[i]

    def search_vectors(self, query_vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Query vectors (Q, D) in item space -> per query [(item_id, cosine), ...] best first."""
        if k < 1:
            raise FallbackError(f"k must be >= 1, got {k}")
        try:
            qv = check_embeddings(query_vectors, self.head.dim, "query vectors")
            ids, scores = self.index.search(self.head.encode(qv), qv, k)
        except HashingError as exc:
            raise FallbackError(str(exc)) from None
        return [[(self.item_of[i], float(s)) for i, s in zip(row_i.tolist(), row_s.tolist()) if i >= 0]
                for row_i, row_s in zip(ids, scores)]

    def search(self, query_texts: Sequence[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """Query texts -> per query [(item_id, cosine), ...] best first (at most k)."""
        if isinstance(query_texts, str):
            raise FallbackError("query_texts must be a list of strings, not a single string")
        if len(query_texts) == 0:
            return []
        return self.search_vectors(self.tower.encode(list(query_texts)), k)

    def bytes_per_item(self) -> dict:
        """Stored bytes per item (packed code + float vector for re-ranking)."""
        return self.index.nbytes_per_item()

    def save(self, path: str | Path) -> None:
        """Folder: tower/, hash/, index/, ids.json (item id <-> faiss id)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tower.save(path / "tower")
        self.head.save(path / "hash")
        self.index.save(path / "index")
        (path / "ids.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "next_id": self.next_id,
                                                   "id_of": self.id_of}))

    @classmethod
    def load(cls, path: str | Path, *, text_encoder: TextTower | None = None,
             dual_encoder: TextTower | None = None) -> "FallbackIndex":
        path = Path(path)
        try:
            meta = json.loads((path / "ids.json").read_text())
        except FileNotFoundError:
            raise FallbackError(f"no fallback index at {path} (ids.json missing)") from None
        except json.JSONDecodeError as exc:
            raise FallbackError(f"corrupt fallback ids.json at {path}: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise FallbackError(f"fallback index at {path} has format {meta.get('format_version')}")
        tower = QueryTower.load(path / "tower", text_encoder=text_encoder, dual_encoder=dual_encoder)
        head = HashHead.load(path / "hash")
        out = cls(tower=tower, head=head)
        out.index = BinaryIndex.load(path / "index")
        out.id_of = {k: int(v) for k, v in meta["id_of"].items()}
        out.item_of = {v: k for k, v in out.id_of.items()}
        out.next_id = int(meta["next_id"])
        if set(out.item_of) != set(out.index.ids.tolist()):
            raise FallbackError(f"fallback index at {path}: ids.json and the binary index disagree")
        return out
