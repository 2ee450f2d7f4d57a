"""Minimal corpus reader for the CLI: JSONL/CSV corpus files, or any caption file ace.importers reads.

JSONL: one object a line with item_id, modality, media, captions (list or "|"-separated), metadata (object).
CSV: header with item_id (required), modality, media, captions ("|"-separated), metadata (JSON object).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ace.corpus import MODALITIES, CorpusItem

from .base import QueryGenError


def _captions(value, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [c.strip() for c in value.split("|") if c.strip()]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return [c.strip() for c in value if c.strip()]
    raise QueryGenError(f"{where}: 'captions' must be a list of strings or a '|'-separated string, got {value!r}")


def _item(rec: dict, where: str) -> CorpusItem:
    if not isinstance(rec, dict):
        raise QueryGenError(f"{where}: expected an object, got {type(rec).__name__}")
    item_id = rec.get("item_id")
    if item_id is None or str(item_id).strip() == "":
        raise QueryGenError(f"{where}: missing 'item_id'")
    modality = (rec.get("modality") or "text").strip()
    if modality not in MODALITIES:
        raise QueryGenError(f"{where}: unknown modality '{modality}'; known: {', '.join(MODALITIES)}")
    meta = rec.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise QueryGenError(f"{where}: 'metadata' is not a JSON object: {meta[:60]!r}") from None
    if not isinstance(meta, dict):
        raise QueryGenError(f"{where}: 'metadata' must be an object")
    return CorpusItem(item_id=str(item_id), modality=modality, media=rec.get("media") or None,
                      captions=_captions(rec.get("captions"), where), metadata=meta)


def read_corpus(path: str | Path, fmt: str | None = None, *, limit: int | None = None) -> list[CorpusItem]:
    """Corpus items from a JSONL/CSV corpus file or a caption file (``fmt``: an ace.importers format)."""
    path = Path(path)
    if not path.is_file():
        raise QueryGenError(f"corpus file not found: {path}")
    items: list[CorpusItem] = []
    if fmt is None and path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise QueryGenError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                    items.append(_item(rec, f"{path}:{lineno}"))
                if limit and len(items) >= limit:
                    break
    elif fmt is None and path.suffix == ".csv" and "item_id" in _csv_header(path):
        with open(path, encoding="utf-8", newline="") as fh:
            for lineno, rec in enumerate(csv.DictReader(fh), 2):
                items.append(_item(rec, f"{path}:{lineno}"))
                if limit and len(items) >= limit:
                    break
    else:
        from ace.importers import CaptionFileError, read_captions

        try:
            caps = read_captions(path, fmt, limit=limit)
        except CaptionFileError as exc:
            raise QueryGenError(f"{exc} (corpus files are .jsonl, or .csv with an item_id column)") from None
        items = [CorpusItem(item_id=c.item_id, modality=c.modality, media=c.media, captions=list(c.captions))
                 for c in caps]
    if not items:
        raise QueryGenError(f"no items in corpus file {path}")
    return items


def _csv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as fh:
        return [h.strip() for h in next(csv.reader(fh), [])]
