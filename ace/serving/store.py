"""Durable item store: one SQLite file (WAL, synchronous=FULL) holding the run's items and their status.

Every item the server knows beyond the trained snapshot lives here: items added after training
(``source="added"``, with their embedding and identifier; served by the fallback index), items
later folded into the generative model (``source="folded"``, see ``mark_folded``) and deletions
of any item (trained, added or folded) as ``status="deleted"`` (a trained item is recorded with
``source="trained"`` when it is first deleted). Each ``add``/``delete`` call is one transaction: when it returns,
the batch is committed to disk (acknowledged = committed); a crash mid-batch leaves none of it.

    store = ItemStore(run_dir / "store.sqlite")
    store.add([CorpusItem("x1", "image", media="x1.jpg", embedding=e, captions=["a dog"])],
              identifiers=[(3, 17, 5, 0)])
    store.delete(["x1"])
    store.close()

Schema version 2 added the "folded" source; a version-1 file is migrated in place on open (one
transaction that rebuilds the items table with the wider CHECK constraint).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ace.data.corpus import MODALITIES, CorpusItem

SCHEMA_VERSION = 2
STATUSES = ("active", "deleted")
SOURCES = ("trained", "added", "folded")

_ITEMS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {{table}} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    media TEXT,
    captions TEXT NOT NULL,
    metadata TEXT NOT NULL,
    embedding BLOB,
    embedding_dim INTEGER,
    identifier TEXT,
    status TEXT NOT NULL CHECK (status IN {STATUSES}),
    source TEXT NOT NULL CHECK (source IN {SOURCES}),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_ITEMS_TABLE.format(table="items")};
CREATE INDEX IF NOT EXISTS items_status ON items (status, source);
"""
_COLUMNS = ("item_id, modality, media, captions, metadata, embedding, embedding_dim, identifier, "
            "status, source, created_at, updated_at")


class StoreError(ValueError):
    """Base class of item-store errors; the message names the item or file."""


class DuplicateItemError(StoreError):
    """An added item id already exists in the store (active or deleted) or twice in one batch."""


class UnknownItemError(StoreError, KeyError):
    """An item id is not in the store (or is already deleted, for ``delete``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


class StoreCorruptError(StoreError):
    """The store file is not a readable ACE item store (corrupt, truncated or foreign)."""


@dataclass
class StoredItem:
    """One row of the store."""
    item_id: str
    modality: str
    media: str | None = None
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: np.ndarray | None = None      # (D,) float32
    identifier: tuple[int, ...] | None = None  # (k, v1..vM, u)
    status: str = "active"
    source: str = "added"
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_corpus_item(self) -> CorpusItem:
        return CorpusItem(item_id=self.item_id, modality=self.modality, media=self.media,
                          embedding=self.embedding, captions=list(self.captions), metadata=dict(self.metadata))


def check_item(item: CorpusItem) -> None:
    if not isinstance(item.item_id, str) or not item.item_id.strip():
        raise StoreError(f"item id must be a non-empty string, got {item.item_id!r}")
    if item.modality not in MODALITIES:
        raise StoreError(f"item {item.item_id!r}: modality must be one of {MODALITIES}, got {item.modality!r}")
    if item.media is not None and not isinstance(item.media, str):
        raise StoreError(f"item {item.item_id!r}: media must be a path string or None")
    if not isinstance(item.captions, (list, tuple)) or not all(isinstance(c, str) for c in item.captions):
        raise StoreError(f"item {item.item_id!r}: captions must be a list of strings")
    if not isinstance(item.metadata, dict):
        raise StoreError(f"item {item.item_id!r}: metadata must be a dict")


def _encode_embedding(item_id: str, embedding: Any) -> tuple[bytes | None, int | None]:
    if embedding is None:
        return None, None
    vec = np.asarray(embedding, dtype=np.float32)
    if vec.ndim != 1 or vec.size == 0:
        raise StoreError(f"item {item_id!r}: embedding must be a non-empty 1-D vector, got shape {vec.shape}")
    if not np.isfinite(vec).all():
        raise StoreError(f"item {item_id!r}: embedding contains NaN or inf")
    return vec.astype("<f4").tobytes(), int(vec.size)


def _encode_identifier(item_id: str, identifier: Any) -> str | None:
    if identifier is None:
        return None
    codes = np.asarray(identifier)
    if codes.ndim != 1 or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer) or (codes < 0).any():
        raise StoreError(f"item {item_id!r}: identifier must be a 1-D sequence of non-negative ints, got {identifier!r}")
    return json.dumps([int(c) for c in codes])


class ItemStore:
    """SQLite item store in WAL mode; thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"item store not found: {self.path}")
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"item store path is not a file: {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute("PRAGMA synchronous=FULL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            if hasattr(self, "_conn"):
                self._conn.close()
            raise StoreCorruptError(f"{self.path} is not a readable ACE item store: {exc}") from None
        if str(mode).lower() != "wal":
            self._conn.close()
            raise StoreError(f"could not put {self.path} in WAL mode (journal_mode={mode})")

    def _init_schema(self) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and not {"meta", "items"} <= tables:
            raise StoreCorruptError(f"{self.path} is an SQLite file but not an ACE item store (tables: {sorted(tables)})")
        if not tables:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                self._conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and row[0] == "1":
            self._migrate_v1()
            row = (str(SCHEMA_VERSION),)
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StoreCorruptError(f"{self.path}: schema version {row[0] if row else None!r}, expected {SCHEMA_VERSION}")

    def _migrate_v1(self) -> None:
        """Version 1 -> 2 in one transaction: rebuild the items table with the "folded" source allowed."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(_ITEMS_TABLE.format(table="items_v2"))
            self._conn.execute(f"INSERT INTO items_v2 (seq, {_COLUMNS}) SELECT seq, {_COLUMNS} FROM items ORDER BY seq")
            self._conn.execute("DROP TABLE items")
            self._conn.execute("ALTER TABLE items_v2 RENAME TO items")
            self._conn.execute("CREATE INDEX IF NOT EXISTS items_status ON items (status, source)")
            self._conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # -- writes: one transaction per call -------------------------------------------------------

    def add(self, items: Sequence[CorpusItem], *, identifiers: Sequence[Any] | None = None,
            source: str = "added") -> int:
        """Insert a batch atomically; returns how many were added. Duplicate ids abort the whole batch."""
        items = list(items)
        if source not in SOURCES:
            raise StoreError(f"source must be one of {SOURCES}, got {source!r}")
        if identifiers is not None and len(identifiers) != len(items):
            raise StoreError(f"got {len(identifiers)} identifiers for {len(items)} items")
        if not items:
            return 0
        seen: set[str] = set()
        rows = []
        now = time.time()
        for i, item in enumerate(items):
            check_item(item)
            if item.item_id in seen:
                raise DuplicateItemError(f"item id {item.item_id!r} appears twice in one batch")
            seen.add(item.item_id)
            blob, dim = _encode_embedding(item.item_id, item.embedding)
            ident = _encode_identifier(item.item_id, identifiers[i] if identifiers is not None else None)
            try:
                captions, metadata = json.dumps(list(item.captions)), json.dumps(item.metadata)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"item {item.item_id!r}: metadata is not JSON-serialisable: {exc}") from None
            rows.append((item.item_id, item.modality, item.media, captions, metadata, blob, dim, ident,
                         "active", source, now, now))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                existing = self._existing(seen)
                if existing:
                    status = ", ".join(f"{k!r} ({v})" for k, v in sorted(existing.items())[:5])
                    raise DuplicateItemError(f"item id(s) already in the store: {status}"
                                             f"{' ...' if len(existing) > 5 else ''}; ids are never reused")
                self._conn.executemany(f"INSERT INTO items ({_COLUMNS}) VALUES ({', '.join('?' * 12)})", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return len(rows)

    def delete(self, item_ids: Iterable[str], *, trained: Sequence[tuple[CorpusItem, Any]] = ()) -> int:
        """Mark active items deleted, atomically; unknown or already-deleted ids abort the whole call.

        ``trained``: (item, identifier) of trained-snapshot items among ``item_ids`` that the store
        has not seen yet; they are inserted as ``source="trained", status="deleted"`` in the same
        transaction.
        """
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return 0
        now = time.time()
        tomb = {}
        for item, identifier in trained:
            check_item(item)
            if item.item_id not in ids:
                raise StoreError(f"trained item {item.item_id!r} is not among the ids to delete")
            tomb[item.item_id] = (item.item_id, item.modality, item.media, json.dumps(list(item.captions)),
                                  json.dumps(item.metadata), None, None, _encode_identifier(item.item_id, identifier),
                                  "deleted", "trained", now, now)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                existing = self._existing(ids)
                clash = [i for i in tomb if i in existing]
                if clash:
                    raise DuplicateItemError(f"trained item(s) already recorded in the store: {clash[:5]}")
                if tomb:
                    self._conn.executemany(f"INSERT INTO items ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                                           list(tomb.values()))
                    existing.update({i: "tombstone" for i in tomb})
                missing = [i for i in ids if i not in existing]
                if missing:
                    raise UnknownItemError(f"unknown item id(s): {', '.join(map(repr, missing[:5]))}"
                                           f"{' ...' if len(missing) > 5 else ''}")
                gone = [i for i in ids if existing[i] == "deleted"]
                if gone:
                    raise UnknownItemError(f"item id(s) already deleted: {', '.join(map(repr, gone[:5]))}")
                self._conn.executemany("UPDATE items SET status='deleted', updated_at=? WHERE item_id=?",
                                       [(now, i) for i in ids if i not in tomb])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return len(ids)

    def mark_folded(self, item_ids: Iterable[str]) -> int:
        """Move active "added" items to source "folded" (now served by the generative model), atomically.

        Ids that are unknown, deleted or not "added" abort the whole call.
        """
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = {}
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    q = f"SELECT item_id, status, source FROM items WHERE item_id IN ({', '.join('?' * len(chunk))})"
                    rows.update({r[0]: r[1:] for r in self._conn.execute(q, chunk).fetchall()})
                missing = [i for i in ids if i not in rows]
                if missing:
                    raise UnknownItemError(f"cannot fold unknown item id(s): {', '.join(map(repr, missing[:5]))}")
                bad = [f"{i!r} ({st}, {src})" for i in ids for st, src in [rows[i]] if (st, src) != ("active", "added")]
                if bad:
                    raise StoreError(f"only active 'added' items can be folded; not: {', '.join(bad[:5])}")
                now = time.time()
                self._conn.executemany("UPDATE items SET source='folded', updated_at=? WHERE item_id=?",
                                       [(now, i) for i in ids])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return len(ids)

    def _existing(self, ids: Iterable[str]) -> dict[str, str]:
        ids = list(ids)
        out: dict[str, str] = {}
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            q = f"SELECT item_id, status FROM items WHERE item_id IN ({', '.join('?' * len(chunk))})"
            out.update(dict(self._conn.execute(q, chunk).fetchall()))
        return out

    # -- reads ----------------------------------------------------------------------------------

    def get(self, item_id: str) -> StoredItem:
        """The item's row (active or deleted); UnknownItemError if it was never stored."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM items WHERE item_id=?", (item_id,)).fetchone()
        if row is None:
            raise UnknownItemError(f"unknown item id: {item_id!r}")
        return self._row(row)

    def __contains__(self, item_id: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM items WHERE item_id=?", (item_id,)).fetchone() is not None

    def status(self, item_id: str) -> str | None:
        """'active', 'deleted', or None when the id was never stored."""
        with self._lock:
            row = self._conn.execute("SELECT status FROM items WHERE item_id=?", (item_id,)).fetchone()
        return row[0] if row else None

    def iterate(self, *, status: str | None = "active", source: str | None = None,
                batch_size: int = 1000, errors: list | None = None) -> Iterator[StoredItem]:
        """Items in insertion order, filtered by status/source (None = any), read in batches.

        A row that cannot be decoded raises StoreCorruptError naming its item; with ``errors`` (a list)
        it is skipped instead and ``(item_id, reason)`` appended, so one bad row cannot stop a load."""
        if status is not None and status not in STATUSES:
            raise StoreError(f"status must be one of {STATUSES} or None, got {status!r}")
        if source is not None and source not in SOURCES:
            raise StoreError(f"source must be one of {SOURCES} or None, got {source!r}")
        filters, params = _filters(status, source)
        where = ["seq > ?", *filters]
        last = 0
        while True:
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT seq, {_COLUMNS} FROM items WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
                    (last, *params, batch_size)).fetchall()
            if not rows:
                return
            for row in rows:
                try:
                    item = self._row(row[1:])
                except (StoreCorruptError, ValueError, TypeError) as exc:  # bad JSON, embedding size, identifier
                    reason = str(exc) if isinstance(exc, StoreCorruptError) else f"row cannot be decoded: {exc}"
                    if errors is None:
                        raise StoreCorruptError(f"item {row[1]!r}: {reason}") from None
                    errors.append((row[1], reason))
                    continue
                yield item
            last = rows[-1][0]

    def list_active(self, *, source: str | None = None) -> list[StoredItem]:
        return list(self.iterate(status="active", source=source))

    def deleted_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT item_id FROM items WHERE status='deleted'")}

    def count(self, *, status: str | None = "active", source: str | None = None) -> int:
        where, params = _filters(status, source)
        q = "SELECT COUNT(*) FROM items" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._lock:
            return int(self._conn.execute(q, params).fetchone()[0])

    def __len__(self) -> int:
        return self.count(status="active")

    @staticmethod
    def _row(row: tuple) -> StoredItem:
        (item_id, modality, media, captions, metadata, blob, dim, ident, status, source, created, updated) = row
        emb = None
        if blob is not None:
            emb = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            if emb.size != dim:
                raise StoreCorruptError(f"item {item_id!r}: embedding has {emb.size} values, expected {dim}")
        return StoredItem(item_id=item_id, modality=modality, media=media, captions=json.loads(captions),
                          metadata=json.loads(metadata), embedding=emb,
                          identifier=tuple(json.loads(ident)) if ident is not None else None,
                          status=status, source=source, created_at=created, updated_at=updated)

    def data_version(self) -> int:
        """SQLite's PRAGMA data_version of this connection: changes whenever another connection (e.g.
        another process) commits to the store, never for this connection's own commits."""
        return int(self.pragma("data_version"))

    def pragma(self, name: str) -> Any:
        """Read a PRAGMA (journal_mode, synchronous, ...) - for checks and tests."""
        if not name.isidentifier():
            raise StoreError(f"not a pragma name: {name!r}")
        with self._lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ItemStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _filters(status: str | None, source: str | None) -> tuple[list[str], list[str]]:
    """SQL conditions and their parameters for an optional status and source."""
    where, params = [], []
    for column, value in (("status", status), ("source", source)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return where, params
