"""Fallback path for items added after training, and merging it with the generative results.

    query text -> QueryTower -> HashHead -> faiss binary ANN (Hamming) -> float cosine re-rank

``FallbackIndex`` holds the items the generative model does not know yet (string item ids);
``merge_rankings`` puts the generative and fallback results into one ranking. The two scores live
on different scales (a beam log-probability vs a cosine), so each source gets a Platt mapping
``p = sigmoid(a * score + b)`` fitted on validation queries: for every returned result, was it the
query's correct item? ``fit_calibration`` fits it from (score, is_correct) samples; the merged
ranking is sorted by that probability, and every result keeps its source.

    fb = FallbackIndex(tower=tower, head=head)
    fb.add(["img_9001"], emb)                 # searchable at once
    fb.search(["a red bus"], k=10)            # [[("img_9001", 0.71), ...]]
    cal = Calibration({"generative": fit_calibration(gen_scores, gen_ok),
                       "fallback": fit_calibration(fb_scores, fb_ok)})
    merge_rankings(gen_results, fb_results, cal, k=10)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from ace.config import ConfigError, from_dict, to_dict
from ace.hashing import BinaryIndex, BinaryIndexConfig, HashConfig, HashHead, HashingError, check_embeddings
from ace.query_tower import QueryTower, QueryTowerConfig, TextTower

FORMAT_VERSION = 1
SOURCES = ("generative", "fallback")


class FallbackError(ValueError):
    """Bad input to the fallback index or merge (unknown/duplicate ids, NaN, shapes, bad files)."""


@dataclass
class FallbackConfig:
    """Everything the fallback path needs: query tower, hash head, binary index (YAML section)."""
    tower: QueryTowerConfig = field(default_factory=QueryTowerConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    index: BinaryIndexConfig = field(default_factory=BinaryIndexConfig)


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


# ---------------------------------------------------------------------------------- calibration
@dataclass
class PlattCalibration:
    """p(correct | score) = sigmoid(a * score + b), fitted per source on validation queries."""
    a: float = 1.0
    b: float = 0.0

    def __call__(self, scores) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-(self.a * s + self.b)))


def fit_calibration(scores, is_correct, *, l2: float = 1e-3, max_iter: int = 100) -> PlattCalibration:
    """Fit a Platt mapping from (score, is_correct) samples by Newton's method on the logistic loss."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_correct, dtype=np.float64).ravel()
    if len(s) != len(y):
        raise FallbackError(f"{len(s)} scores but {len(y)} labels")
    if len(s) < 2:
        raise FallbackError("fit_calibration needs at least 2 samples")
    if not np.isfinite(s).all():
        raise FallbackError("calibration scores contain NaN or infinite values")
    if y.min() == y.max():
        raise FallbackError("calibration samples must contain both correct and incorrect results")
    x = np.stack([s, np.ones_like(s)], axis=1)  # (N, 2)
    w = np.zeros(2)
    reg = np.diag([l2, 0.0]) * len(s)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return PlattCalibration(a=float(w[0]), b=float(w[1]))


def calibration_samples(results: Sequence[Sequence[tuple[Hashable, float]]], targets: Sequence[Hashable]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query results [(item_id, score), ...] + the correct item per query -> (scores, is_correct)."""
    if len(results) != len(targets):
        raise FallbackError(f"{len(results)} result lists but {len(targets)} targets")
    scores = [s for res in results for _, s in res]
    correct = [item == t for res, t in zip(results, targets) for item, _ in res]
    return np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)


@dataclass
class Calibration:
    """One Platt mapping per source ("generative", "fallback")."""
    generative: PlattCalibration
    fallback: PlattCalibration

    def to_dict(self) -> dict:
        return {"generative": to_dict(self.generative), "fallback": to_dict(self.fallback)}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        try:
            return cls(generative=from_dict(PlattCalibration, data["generative"]),
                       fallback=from_dict(PlattCalibration, data["fallback"]))
        except (KeyError, TypeError, ConfigError) as exc:
            raise FallbackError(f"bad calibration data: {exc}") from None

    @classmethod
    def fit(cls, generative: tuple, fallback: tuple) -> "Calibration":
        """Each source: (scores, is_correct) samples (see calibration_samples)."""
        return cls(generative=fit_calibration(*generative), fallback=fit_calibration(*fallback))


@dataclass
class MergedResult:
    item_id: str
    score: float       # calibrated probability that this is the query's item
    source: str        # "generative" | "fallback"
    raw_score: float   # the source's own score (log-probability or cosine)


def merge_rankings(generative: Sequence[tuple[str, float]], fallback: Sequence[tuple[str, float]],
                   calibration: Calibration, *, k: int | None = None) -> list[MergedResult]:
    """One query's generative and fallback results -> one ranking by calibrated probability.

    An item present in both lists is kept once, with its higher calibrated score (ties: generative).
    """
    best: dict[str, MergedResult] = {}
    for source, results, cal in (("generative", generative, calibration.generative),
                                 ("fallback", fallback, calibration.fallback)):
        if not results:
            continue
        raw = np.asarray([s for _, s in results], dtype=np.float64)
        if not np.isfinite(raw).all():
            raise FallbackError(f"{source} scores contain NaN or infinite values")
        for (item_id, r), p in zip(results, cal(raw)):
            prev = best.get(item_id)
            if prev is None or p > prev.score:
                best[item_id] = MergedResult(item_id, float(p), source, float(r))
    merged = sorted(best.values(), key=lambda m: (-m.score, SOURCES.index(m.source)))
    return merged[:k] if k is not None else merged
