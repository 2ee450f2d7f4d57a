"""Checks and loaders for what callers hand the identifier builder: embeddings and item ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ace.arrays import unit_rows


class IdentifierInputError(ValueError):
    """Bad embeddings, item ids or embedding files; the message names the problem and the rows."""


def _rows(idx: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", ... ({idx.size} rows in all)" if idx.size > limit else "")


def check_embeddings(x, *, dim: int | None = None, chunk: int = 65_536, name: str = "embeddings"):
    """Return ``x`` as a 2-D float numpy array (no copy for numpy/memmap input) after checking
    shape, dtype, emptiness, NaN/inf and all-zero rows (which cannot be L2-normalised)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):          # torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise IdentifierInputError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise IdentifierInputError(f"{name} must be a 2-D (N, D) array, got {x.ndim}-D shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise IdentifierInputError(f"{name} must be floating point (float32), got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise IdentifierInputError(f"{name} is empty: shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise IdentifierInputError(f"{name} have dimension {x.shape[1]}, the tokenizer was fitted on {dim}")
    bad_finite, bad_zero = [], []
    for start in range(0, x.shape[0], chunk):
        block = np.asarray(x[start:start + chunk], dtype=np.float32)
        finite = np.isfinite(block).all(1)
        bad_finite.append(np.flatnonzero(~finite) + start)
        norms = np.linalg.norm(np.where(finite[:, None], block, 0), axis=1)
        bad_zero.append(np.flatnonzero(finite & (norms == 0)) + start)
    bad = np.concatenate(bad_finite)
    if bad.size:
        raise IdentifierInputError(f"{name} contain NaN or inf in row(s) {_rows(bad)}")
    zero = np.concatenate(bad_zero)
    if zero.size:
        raise IdentifierInputError(f"{name} have all-zero row(s) {_rows(zero)} that cannot be L2-normalised")
    return x


def check_item_ids(item_ids, n: int) -> list[str]:
    """``n`` unique string ids; duplicates are named."""
    if isinstance(item_ids, str):
        raise IdentifierInputError("item_ids must be a list of strings, not one string")
    item_ids = list(item_ids)
    if len(item_ids) != n:
        raise IdentifierInputError(f"got {n} embeddings but {len(item_ids)} item ids")
    for i, item in enumerate(item_ids):
        if not isinstance(item, str):
            raise IdentifierInputError(f"item id at row {i} must be a str, got {type(item).__name__} {item!r}")
    if len(set(item_ids)) != n:
        first: dict[str, int] = {}
        for i, item in enumerate(item_ids):
            if item in first:
                raise IdentifierInputError(f"duplicate item id {item!r} at rows {first[item]} and {i}")
            first[item] = i
    return item_ids


def l2_normalise(block: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (ace.arrays.unit_rows; rows were checked to be finite and non-zero)."""
    return unit_rows(block, error=IdentifierInputError)


def load_embeddings(path: str | Path, *, ids_column: str = "item_id"):
    """Read embeddings (+ item ids if the file holds them) from .npy, .pt or .parquet.

    .npy: an (N, D) array (memory-mapped). .pt: a tensor, or a dict with ``embeddings`` and
    optional ``item_ids``. .parquet: a list column ``embedding`` (or ``embeddings``) and an optional
    ``item_id`` column. Returns ``(embeddings, item_ids or None)``.
    """
    path = Path(path)
    if not path.is_file():
        raise IdentifierInputError(f"embeddings file not found: {path}")
    if path.stat().st_size == 0:
        raise IdentifierInputError(f"embeddings file {path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        if suffix == ".pt":
            import torch
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "embeddings" not in obj:
                    raise IdentifierInputError(f"{path} holds a dict without an 'embeddings' key "
                                               f"(keys: {sorted(obj)})")
                ids = obj.get("item_ids")
                return obj["embeddings"], (list(ids) if ids is not None else None)
            return obj, None
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            col = next((c for c in ("embedding", "embeddings") if c in table.column_names), None)
            if col is None:
                raise IdentifierInputError(f"{path} has no 'embedding' column (columns: {table.column_names})")
            values = table.column(col).to_pylist()
            if not values:
                raise IdentifierInputError(f"{path} has no rows")
            if len({len(v) if v is not None else -1 for v in values}) != 1 or values[0] is None:
                raise IdentifierInputError(f"{path}: embedding rows have different lengths or nulls")
            ids = table.column(ids_column).to_pylist() if ids_column in table.column_names else None
            return np.asarray(values, dtype=np.float32), ids
    except IdentifierInputError:
        raise
    except Exception as exc:  # a truncated / foreign file: name it, keep the reader's reason
        raise IdentifierInputError(f"cannot read embeddings from {path}: {type(exc).__name__}: {exc}") from None
    raise IdentifierInputError(f"unsupported embeddings file type '{suffix}' for {path}; use .npy, .pt or .parquet")
