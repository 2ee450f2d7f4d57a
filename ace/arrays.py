"""Embedding matrices and devices, one rule each: the checks (2-D, dimension, finite), the L2
normalisation (an all-zero row has no direction: always an error, never silently kept) and the
device resolution ("auto" -> CUDA when present, else CPU; an explicit CUDA device without CUDA is
an error). Each caller passes its own error class, so messages name the problem in its terms.

identifiers/inputs.py keeps its own chunked check for (memory-mapped) inputs of any size; it
normalises and resolves devices here.
"""
from __future__ import annotations

import numpy as np


def _rows(idx: np.ndarray, limit: int = 10) -> list[int]:
    return idx[:limit].tolist()


def check_matrix(x, *, dim: int | None = None, name: str = "embeddings", error: type[Exception] = ValueError
                 ) -> np.ndarray:
    """``x`` as a C-contiguous float32 (N, D) array: 2-D, ``dim`` columns when given, finite values;
    otherwise ``error`` naming the problem (and the first bad rows)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise error(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise error(f"{name} have dimension {x.shape[1]}, expected {dim}")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise error(f"{name} contain NaN or infinite values (rows {_rows(np.flatnonzero(~finite))})")
    return np.ascontiguousarray(x)


def unit_rows(x, *, error: type[Exception] = ValueError, where: str = "") -> np.ndarray:
    """Rows (of a (..., D) array) scaled to unit L2 norm, as float32. A row that is all zeros (norm
    below 1e-12) or not finite has no direction: ``error`` names its rows (``where`` prefixes the message)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    bad = ~(np.isfinite(norms) & (norms >= 1e-12))[..., 0]
    if bad.any():
        raise error(f"{where}zero or non-finite embeddings for rows {_rows(np.flatnonzero(bad.reshape(-1)))}")
    return x / norms


def resolve_device(name: str | None = "auto", *, error: type[Exception] = ValueError) -> str:
    """"auto" (or empty) -> "cuda" when a GPU is present, else "cpu"; a CUDA device without CUDA is ``error``."""
    import torch

    if name in ("auto", "", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise error(f"device '{name}' requested but CUDA is not available")
    return str(name)
