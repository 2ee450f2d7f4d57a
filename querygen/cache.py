"""Append-only JSONL cache of raw generations, keyed by (item_id, backend, fingerprint) and checked against
the item's inputs (``item_inputs``: modality, media, captions, description): an edited item is generated again."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .base import GeneratedQuery

log = logging.getLogger(__name__)


class QueryCache:
    """One JSON line per finished item; a killed run restarts from the items not yet in the file."""

    def __init__(self, path: str | Path, *, backend: str, fingerprint: str):
        self.path = Path(path)
        self.backend, self.fingerprint = backend, fingerprint

    def load(self, inputs: dict[str, str] | None = None) -> dict[str, list[GeneratedQuery]]:
        """item_id -> raw queries for entries written by this backend + fingerprint (others are kept, ignored).
        ``inputs`` (item_id -> ``item_inputs``): only entries generated from those same inputs count; an entry
        of an item whose captions, media or description changed since (or of an older cache without the
        record) is ignored, so that item is generated again."""
        done: dict[str, list[GeneratedQuery]] = {}
        if not self.path.is_file():
            return done
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = (rec["item_id"], rec["backend"], rec["fingerprint"])
                    queries = [GeneratedQuery(rec["item_id"], q["query"], q["source"], q.get("prompt", ""))
                               for q in rec["queries"]]
                except (json.JSONDecodeError, KeyError, TypeError):
                    # a run killed mid-write leaves a torn last line; that item is simply redone
                    log.warning("cache %s: ignoring malformed line %d", self.path, lineno)
                    continue
                if key[1:] == (self.backend, self.fingerprint) and (inputs is None or rec.get("inputs") == inputs.get(key[0])):
                    done[key[0]] = queries
        return done

    def append(self, finished: dict[str, list[GeneratedQuery]], inputs: dict[str, str] | None = None) -> None:
        """Write one line per finished item and fsync, so a kill after this call loses nothing."""
        if not finished:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        with open(self.path, "a", encoding="utf-8") as fh:
            if torn:
                fh.write("\n")  # close a torn line left by a killed run so the next record stays parseable
            for item_id, queries in finished.items():
                rec = {"item_id": item_id, "backend": self.backend, "fingerprint": self.fingerprint,
                       "inputs": (inputs or {}).get(item_id), "queries": [{"query": q.query, "source": q.source, "prompt": q.prompt} for q in queries]}
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"


def item_inputs(item) -> str:
    """A digest of what a backend generates from: the item's modality, media path, captions and description."""
    blob = json.dumps([item.modality, item.media, list(item.captions), item.description()], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
