"""Search arguments given once for all queries or once per query (``k``, ``num_beams``, ``modality``), as
``Retriever.search`` takes them: checks, expansion to per-query lists, and one search per beam width for
the modes that decode one width per call."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ace.data.corpus import MODALITIES
from ace.serving.errors import RetrieverError
from ace.validation import InputError, check_query


def check_queries(queries, k) -> None:
    if isinstance(queries, str):
        raise RetrieverError("search() takes a list of query strings, not a single string")
    if min(np.ravel(k), default=1) < 1:
        raise RetrieverError(f"k must be >= 1, got {min(np.ravel(k))}")
    for i, q in enumerate(queries):
        try:
            check_query(q, f"query {i}", max_chars=1 << 20)  # well-formed text; length is the caller's policy
        except InputError as exc:
            raise RetrieverError(str(exc)) from None


def modalities(modality, n: int) -> list[str | None]:
    """``modality`` (None, one modality, or one per query) as a list of n filters."""
    mods = [modality] * n if modality is None or isinstance(modality, str) else list(modality)
    if len(mods) != n:
        raise RetrieverError(f"got {len(mods)} modality filters for {n} queries")
    bad = [m for m in mods if m is not None and m not in MODALITIES]
    if bad:
        raise RetrieverError(f"unknown modality {bad[0]!r}; known: {', '.join(MODALITIES)}")
    return mods


def widths(k, num_beams, n: int, default_beams: int) -> tuple[list[int], list[int]]:
    """``k`` and ``num_beams`` (one value, or one per query) -> each query's k and beam width (its
    num_beams or ``default_beams``, raised to its k)."""
    ks = [int(x) for x in np.ravel(k)] * (n if np.ndim(k) == 0 else 1)
    nb = [num_beams] * n if num_beams is None or np.ndim(num_beams) == 0 else list(num_beams)
    if len(ks) != n or len(nb) != n:
        raise RetrieverError(f"got {len(ks)} k and {len(nb)} num_beams values for {n} queries")
    return ks, [max(int(b or default_beams), kk) for b, kk in zip(nb, ks)]


def pick(value, idx: list[int]):
    """One value for all queries stays as it is; one per query -> the values of queries ``idx``."""
    return value if value is None or np.ndim(value) == 0 else [value[i] for i in idx]


def search_by_width(search: Callable, queries, k, num_beams, modality, default_beams: int, **kw) -> list:
    """``search(queries, k, width, modalities, **kw)`` once per distinct beam width (largest k of the
    group), each query's hits cut to its own k."""
    check_queries(queries, k)
    ks, ws = widths(k, num_beams, len(queries), default_beams)
    mods = modalities(modality, len(queries))
    out: list = [None] * len(queries)
    for w in set(ws):
        idx = [i for i, x in enumerate(ws) if x == w]
        for i, row in zip(idx, search([queries[i] for i in idx], max(ks[i] for i in idx), w, [mods[i] for i in idx], **kw)):
            out[i] = row[:ks[i]]
    return out
