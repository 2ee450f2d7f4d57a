"""Fallback path for items added after training, and merging it with the generative results.

    query text -> QueryTower -> HashHead -> faiss binary ANN (Hamming) -> float cosine re-rank

``FallbackIndex`` holds the items the generative model does not know yet (string item ids);
``merge_rankings`` puts the generative and fallback results into one ranking. The sources' own
scores live on different scales (a beam log-probability vs a cosine), and the generative model's
log-probabilities on the only queries available at fallback time (its training queries) are
over-confident, so a Platt fit on them mis-ranks held-out queries. A run's calibration therefore
uses one common scale (``scale="cosine"``): every candidate, generative or fallback, is scored by
the query tower's cosine to that item's embedding, mapped by ``p = sigmoid(a * cosine + b)``
fitted on queries the tower never trained on. ``scale="raw"`` (older runs, hand-made calibrations)
maps each source's own score with its own Platt mapping. The merged ranking is sorted by that
probability, and every result keeps its source and raw score.

    fb = FallbackIndex(tower=tower, head=head)
    fb.add(["img_9001"], emb)                 # searchable at once
    fb.search(["a red bus"], k=10)            # [[("img_9001", 0.71), ...]]
    platt = fit_calibration(fb_cosines, fb_ok)
    cal = Calibration(generative=platt, fallback=platt, scale="cosine")
    merge_rankings(gen_results, fb_results, cal, k=10, generative_cosines=[[0.62, 0.40, ...]])
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from ace.config import ConfigError, from_dict, to_dict
from ace.newitems.hashing import BinaryIndex, BinaryIndexConfig, HashConfig, HashHead, HashingError, check_embeddings
from ace.newitems.query_tower import QueryTower, QueryTowerConfig, TextTower

FORMAT_VERSION = 1
SOURCES = ("generative", "fallback")
SCALES = ("cosine", "raw")


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
    """One Platt mapping per source ("generative", "fallback") over a score ``scale``: "cosine" (the
    query tower's cosine to each candidate's item embedding, for both sources) or "raw" (each
    source's own score: generative log-probability, fallback cosine)."""
    generative: PlattCalibration
    fallback: PlattCalibration
    scale: str = "raw"

    def __post_init__(self):
        if self.scale not in SCALES:
            raise FallbackError(f"calibration scale must be one of {SCALES}, got {self.scale!r}")

    def to_dict(self) -> dict:
        return {"generative": to_dict(self.generative), "fallback": to_dict(self.fallback), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        try:
            return cls(generative=from_dict(PlattCalibration, data["generative"]),
                       fallback=from_dict(PlattCalibration, data["fallback"]), scale=data.get("scale", "raw"))
        except (KeyError, TypeError, AttributeError, ConfigError) as exc:
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
                   calibration: Calibration, *, k: int | None = None,
                   generative_cosines: Sequence[float] | None = None) -> list[MergedResult]:
    """One query's generative and fallback results -> one ranking by calibrated probability.

    With ``calibration.scale == "cosine"`` the generative results are mapped by ``generative_cosines``
    (the query tower's cosine to each result's item embedding, same order) instead of their
    log-probabilities; fallback results' own scores are already that cosine.
    An item present in both lists is kept once, with its higher calibrated score (ties: generative).
    """
    gen_values = [s for _, s in generative]
    if calibration.scale == "cosine" and generative:
        if generative_cosines is None or len(generative_cosines) != len(generative):
            raise FallbackError(f"a cosine-scale calibration needs one tower cosine per generative result "
                                f"({len(generative)} results, "
                                f"{'none' if generative_cosines is None else len(generative_cosines)} cosines)")
        gen_values = list(generative_cosines)
    best: dict[str, MergedResult] = {}
    for source, results, values, cal in (("generative", generative, gen_values, calibration.generative),
                                         ("fallback", fallback, [s for _, s in fallback], calibration.fallback)):
        if not results:
            continue
        raw = np.asarray(values, dtype=np.float64)
        if not np.isfinite(raw).all() or not np.isfinite([s for _, s in results]).all():
            raise FallbackError(f"{source} scores contain NaN or infinite values")
        for (item_id, r), p in zip(results, cal(raw)):
            prev = best.get(item_id)
            if prev is None or p > prev.score:
                best[item_id] = MergedResult(item_id, float(p), source, float(r))
    merged = sorted(best.values(), key=lambda m: (-m.score, SOURCES.index(m.source)))
    return merged[:k] if k is not None else merged


# ---------------------------------------------------------------------------------- run folder
class RunTextTower:
    """A dual encoder's text tower mapped into a run's item space (the run's fixed modality projection)."""

    def __init__(self, encoder, projection):
        self.encoder, self.projection = encoder, projection
        self.dim = int(projection.d_out)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.projection(np.asarray(self.encoder.encode_texts(list(texts)), dtype=np.float32))


def run_text_tower(encoder_config, modalities: Sequence[str]) -> RunTextTower | None:
    """The item encoder's own text tower when the run's items all come from one dual encoder (CLIP/CLAP,
    kind "hf") whose space the text can share; None otherwise (frozen text encoder + trained projection).

    Several modalities share one text tower only when their projection to the common dimension is the
    identity (each modality gets its own seeded projection otherwise).
    """
    from ace.data.encoders import ModalityProjection, build_encoder

    modalities = sorted(set(modalities))
    subs = [getattr(encoder_config, m) for m in modalities]
    if not subs or any(s.kind != "hf" for s in subs) or len({s.name_or_path for s in subs}) != 1:
        return None
    encoder = build_encoder(subs[0])
    d_out = encoder_config.dim or encoder.dim
    if len(modalities) > 1 and d_out != encoder.dim:
        return None
    return RunTextTower(encoder, ModalityProjection(encoder.dim, d_out, kind=encoder_config.projection,
                                                    seed=encoder_config.seed, modality=modalities[0]))


def read_encoder_config(run_dir: str | Path):
    """The run's item-encoder config (RUN/config.yaml, section ``encoder``), or None when absent."""
    import yaml

    from ace.data.encoders import MultiModalEncoderConfig

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return from_dict(MultiModalEncoderConfig, data.get("encoder") or {}, prefix="encoder.")
    except ConfigError as exc:
        raise FallbackError(f"{path}: {exc}") from None


def build_run_fallback(run_dir: str | Path, config: FallbackConfig, *, seed: int = 0, device: str = "cpu",
                       text_encoder: TextTower | None = None, progress: bool = False) -> dict:
    """The pipeline's ``fallback`` stage: train the query tower + hash head on the run's training pairs,
    fit the calibration on held-out training queries, save RUN/fallback (empty index) atomically.

    Calibration (scale "cosine"): ``calibration_queries`` training queries kept out of the query
    tower's training are answered by the fallback over all trained items put into a scratch index;
    one Platt mapping of the tower cosine is fitted on those (cosine, is_correct) samples and used
    for both sources, so merged search compares every candidate on the tower's cosine. The
    generative model's log-probabilities are not calibrated: it trained on these queries, and a fit
    on them over-trusts it on held-out queries (old-item R@10 through merged search fell from 41.6
    to 27.1 on MSCOCO 80/20; benchmarks/results/new_items.md). The generative path's recall on the
    same queries is still recorded. Returns a summary (also written to RUN/fallback/summary.json).
    """
    import shutil

    from ace.metrics import retrieval_metrics
    from ace.serving.retriever import Retriever
    from ace.run_folder import load_run_corpus, load_run_embeddings

    run_dir = Path(run_dir)
    pairs = [tuple(p) for p in json.loads((run_dir / "train_queries.json").read_text())]  # (query, item_id)
    item_ids, emb = load_run_embeddings(run_dir)
    n_cal = min(config.calibration_queries, len(pairs) // 2)
    if n_cal < 2:
        raise FallbackError(f"{run_dir} has {len(pairs)} training queries: too few to hold out calibration queries")
    order = np.random.default_rng(seed).permutation(len(pairs))
    cal = [pairs[i] for i in order[:n_cal]]
    fit_pairs = [(pairs[i][1], pairs[i][0]) for i in order[n_cal:]]  # (item_id, query)
    modalities = {it.modality for it in load_run_corpus(run_dir).items}
    enc_cfg = read_encoder_config(run_dir)
    dual = run_text_tower(enc_cfg, modalities) if enc_cfg is not None else None
    fb = FallbackIndex.train(config=config, pairs=fit_pairs, item_ids=item_ids, item_embeddings=emb,
                             text_encoder=None if dual else text_encoder, dual_encoder=dual, progress=progress)

    queries, targets = [q for q, _ in cal], [t for _, t in cal]
    scratch = FallbackIndex(tower=fb.tower, head=fb.head, config=config.index)
    scratch.add(item_ids, emb)
    fb_res = scratch.search(queries, k=config.calibration_k)
    gen = Retriever.from_run(run_dir, device=device, fallback=False)
    gen_res = [[(h.item_id, h.score) for h in row] for row in gen.search_generative(queries, k=config.calibration_k)]
    gen.close()
    scores, ok = calibration_samples(fb_res, targets)
    if ok.all() or not ok.any():
        raise FallbackError(f"calibration: the fallback results of {n_cal} held-out queries are all "
                            f"{'correct' if ok.all() else 'wrong'}; cannot fit a score mapping "
                            f"(raise fallback.calibration_queries or check the query tower)")
    platt = fit_calibration(scores, ok)
    if platt.a <= 0:
        raise FallbackError(f"calibration: higher tower cosines are not more often correct on the held-out "
                            f"queries (slope {platt.a:.3g}); the merged ranking would be meaningless")
    calibration = Calibration(generative=platt, fallback=platt, scale="cosine")
    summary = {
        "tower": "dual" if dual else "projected", "bits": config.hash.bits, "index": config.index.kind,
        "tower_pairs": len(fit_pairs), "calibration_queries": n_cal, "calibration": calibration.to_dict(),
        "bytes_per_item": fb.bytes_per_item(),
        "held_out_recall": {"fallback_over_trained_items": retrieval_metrics([[i for i, _ in r] for r in fb_res], targets),
                            "generative": retrieval_metrics([[i for i, _ in r] for r in gen_res], targets)},
    }
    staging = run_dir / "fallback.staging"
    if staging.exists():
        shutil.rmtree(staging)
    fb.save(staging)
    (staging / "calibration.json").write_text(json.dumps(calibration.to_dict(), indent=1))
    (staging / "summary.json").write_text(json.dumps(summary, indent=1))
    final, old = run_dir / "fallback", run_dir / "fallback.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return summary


def load_calibration(path: str | Path) -> Calibration:
    """RUN/fallback/calibration.json -> Calibration."""
    path = Path(path)
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FallbackError(f"no calibration at {path}") from None
    except json.JSONDecodeError as exc:
        raise FallbackError(f"corrupt calibration file {path}: {exc}") from None
