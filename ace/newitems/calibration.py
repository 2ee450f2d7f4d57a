"""Merging the generative and fallback results into one ranking by calibrated probability.

The sources' own scores live on different scales (a beam log-probability vs a cosine), and the
generative model's log-probabilities on the only queries available at fallback time (its training
queries) are over-confident, so a Platt fit on them mis-ranks held-out queries. A run's calibration
therefore uses one common scale (``scale="cosine"``): every candidate, generative or fallback, is
scored by the query tower's cosine to that item's embedding, mapped by ``p = sigmoid(a * cosine + b)``
fitted on queries the tower never trained on. ``scale="raw"`` (older runs, hand-made calibrations)
maps each source's own score with its own Platt mapping. The merged ranking is sorted by that
probability, and every result keeps its source and raw score.

    platt = fit_calibration(fb_cosines, fb_ok)
    cal = Calibration(generative=platt, fallback=platt, scale="cosine")
    merge_rankings(gen_results, fb_results, cal, k=10, generative_cosines=[[0.62, 0.40, ...]])
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from ace.config import ConfigError, from_dict, to_dict
from ace.newitems.index import FallbackError

SOURCES = ("generative", "fallback")
SCALES = ("cosine", "raw")


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


def load_calibration(path: str | Path) -> Calibration:
    """RUN/fallback/calibration.json -> Calibration."""
    path = Path(path)
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FallbackError(f"no calibration at {path}") from None
    except json.JSONDecodeError as exc:
        raise FallbackError(f"corrupt calibration file {path}: {exc}") from None
