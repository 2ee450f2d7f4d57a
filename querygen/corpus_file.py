"""Corpus reading for the CLI: ``ace.data.corpus.load_corpus`` (JSONL/CSV/Parquet tables or caption files).

Media files are not required to exist here: the mllm backend reports and skips items whose media is
missing or unreadable, so one bad file does not stop a 100k-item run.
"""
from __future__ import annotations

from pathlib import Path

from ace.data.corpus import CorpusError, CorpusItem, load_corpus

from .base import QueryGenError


def read_corpus(path: str | Path, fmt: str | None = None, *,
                limit: int | None = None) -> tuple[list[CorpusItem], Path | None]:
    """(items, media root) from a corpus table or a caption file (``fmt``: an ace.data.importers format)."""
    try:
        corpus = load_corpus(path, fmt=fmt, check_media=False)
    except (CorpusError, ValueError) as exc:  # CaptionFileError is a ValueError too
        raise QueryGenError(str(exc)) from None
    items = list(corpus)[:limit] if limit else list(corpus)
    if not items:
        raise QueryGenError(f"no items in corpus file {path}")
    return items, corpus.root
