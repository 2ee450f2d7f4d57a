"""The item store's interface, shared by its two backends: SQLite (``ace/serving/store.py``, the embedded
default, RUN/store.sqlite) and PostgreSQL (``ace/serving/store_pg.py``, shared by serving replicas).

Rows: ``(item_id, modality, media, captions, metadata, embedding, identifier, status, source, change_seq)``.
Every write (``add``, ``delete``, ``mark_folded``) is one transaction that first takes the next value of
the store's **change sequence** (a counter in the ``meta`` table, bumped by an UPDATE: the row lock it
takes serialises writers, so change sequence order is commit order) and stamps it on every row it
touches. A reader that remembers the largest change sequence it has applied reads exactly what other
writers committed since with ``changes(since)``: that is how replicas stay in step.

``transaction()`` opens that write transaction explicitly, so a caller can catch up with ``changes`` and
assign identifiers while holding the store's write lock, then write; the writes inside it join it.
Identifiers are unique in the store (checked in the transaction; the PostgreSQL schema also has a
UNIQUE constraint): ``IdentifierConflictError`` means the caller's view was stale - catch up and retry.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ace.data.corpus import MODALITIES, CorpusItem
from ace.serving.errors import MessageKeyError

STATUSES = ("active", "deleted")
SOURCES = ("trained", "added", "folded")
_COLUMNS = ("item_id, modality, media, captions, metadata, embedding, embedding_dim, identifier, "
            "status, source, created_at, updated_at")
_INSERT = f"INSERT INTO items ({_COLUMNS}, change_seq) VALUES ({', '.join('?' * 13)})"


class StoreError(ValueError):
    """Base class of item-store errors; the message names the item or file."""


class DuplicateItemError(StoreError):
    """An added item id already exists in the store (active or deleted) or twice in one batch."""


class IdentifierConflictError(StoreError):
    """An identifier to store is already another item's: the writer's view of the store was stale."""


class UnknownItemError(StoreError, MessageKeyError):
    """An item id is not in the store (or is already deleted, for ``delete``)."""


class StoreCorruptError(StoreError):
    """The store is not a readable ACE item store (corrupt, truncated, foreign or a newer schema)."""


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


def _filters(status: str | None, source: str | None) -> tuple[list[str], list[str]]:
    """SQL conditions and their parameters for an optional status and source."""
    where, params = [], []
    for column, value in (("status", status), ("source", source)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return where, params


def _chunks(ids: list, size: int = 500) -> Iterator[list]:
    """Stay under the backends' bound-parameter limits."""
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


class BaseItemStore:
    """Everything but the connection: a backend sets ``backend`` and implements ``_execute`` (one statement,
    ``?`` placeholders; returns rows for a query) and ``_begin`` / ``_commit`` / ``_rollback``."""

    backend = "?"
    integrity_errors: tuple[type[BaseException], ...] = ()   # the driver's unique-violation error types

    def __init__(self) -> None:
        self._lock = threading.RLock()   # one connection, one transaction at a time per process
        self._tx_seq: int | None = None   # the change sequence of the open write transaction
        self.last_commit_seq: int | None = None  # the change sequence of this process's last committed write

    # -- the connection, per backend ----------------------------------------------------------------------
    def _execute(self, sql: str, params: Sequence = (), *, many: bool = False) -> list[tuple]:
        raise NotImplementedError

    def _begin(self) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self):
        """One write transaction, holding the store's write lock from its start (the change-sequence row);
        writes inside it join it. Committed when the block ends, rolled back when it raises."""
        with self._lock:
            if self._tx_seq is not None:  # nested: join the open transaction
                yield self
                return
            self._begin()
            try:
                self._execute("UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) WHERE key = 'change_seq'")
                self._tx_seq = int(self._execute("SELECT value FROM meta WHERE key = 'change_seq'")[0][0])
                yield self
                self._commit()
            except BaseException:
                self._tx_seq = None
                self._rollback()
                raise
            self.last_commit_seq, self._tx_seq = self._tx_seq, None

    def _unique_violation(self, exc: BaseException) -> StoreError:
        text = str(exc).lower()
        if "identifier" in text:
            return IdentifierConflictError(f"an identifier to store is already another item's ({exc})")
        return DuplicateItemError(f"item id(s) already in the store; ids are never reused ({exc})")

    # -- writes: one transaction per call (or the caller's) -----------------------------------------------
    def add(self, items: Sequence[CorpusItem], *, identifiers: Sequence[Any] | None = None,
            source: str = "added") -> int:
        """Insert a batch atomically; returns how many were added. Duplicate ids abort the whole batch,
        and so does an identifier that another item holds (IdentifierConflictError)."""
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
            rows.append([item.item_id, item.modality, item.media, captions, metadata, blob, dim, ident,
                         "active", source, now, now])
        with self.transaction():
            existing = self._existing(seen)
            if existing:
                status = ", ".join(f"{k!r} ({v})" for k, v in sorted(existing.items())[:5])
                raise DuplicateItemError(f"item id(s) already in the store: {status}"
                                         f"{' ...' if len(existing) > 5 else ''}; ids are never reused")
            self._check_identifiers_free([r[7] for r in rows if r[7] is not None])
            self._insert(rows)
        return len(rows)

    def _insert(self, rows: list[list]) -> None:
        try:
            self._execute(_INSERT, [(*r, self._tx_seq) for r in rows], many=True)
        except self.integrity_errors as exc:
            raise self._unique_violation(exc) from None

    def _check_identifiers_free(self, idents: list[str]) -> None:
        if len(set(idents)) != len(idents):
            raise IdentifierConflictError("two items of one batch have the same identifier")
        held = []
        for chunk in _chunks(idents):
            held += self._execute(f"SELECT item_id, identifier FROM items WHERE identifier IN ({', '.join('?' * len(chunk))})",
                                  chunk)
        if held:
            raise IdentifierConflictError(f"identifier(s) already held by other items: "
                                          f"{', '.join(f'{i!r} {ident}' for i, ident in held[:5])}")

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
            tomb[item.item_id] = [item.item_id, item.modality, item.media, json.dumps(list(item.captions)),
                                  json.dumps(item.metadata), None, None, _encode_identifier(item.item_id, identifier),
                                  "deleted", "trained", now, now]
        with self.transaction():
            existing = self._existing(ids)
            clash = [i for i in tomb if i in existing]
            if clash:
                raise DuplicateItemError(f"trained item(s) already recorded in the store: {clash[:5]}")
            if tomb:
                self._insert(list(tomb.values()))
                existing.update({i: "tombstone" for i in tomb})
            missing = [i for i in ids if i not in existing]
            if missing:
                raise UnknownItemError(f"unknown item id(s): {', '.join(map(repr, missing[:5]))}"
                                       f"{' ...' if len(missing) > 5 else ''}")
            gone = [i for i in ids if existing[i] == "deleted"]
            if gone:
                raise UnknownItemError(f"item id(s) already deleted: {', '.join(map(repr, gone[:5]))}")
            self._execute("UPDATE items SET status = 'deleted', updated_at = ?, change_seq = ? WHERE item_id = ?",
                          [(now, self._tx_seq, i) for i in ids if i not in tomb], many=True)
        return len(ids)

    def mark_folded(self, item_ids: Iterable[str], *, fold: int | None = None) -> int:
        """Move active "added" items to source "folded" (now served by the generative model), atomically;
        ``fold``: the fold's number, recorded as the store's ``model_fold`` marker in the same transaction
        (replicas reload the model when it changes). Unknown, deleted or not "added" ids abort the call."""
        ids = list(dict.fromkeys(item_ids))
        if not ids and fold is None:
            return 0
        with self.transaction():
            rows = {}
            for chunk in _chunks(ids):
                q = f"SELECT item_id, status, source FROM items WHERE item_id IN ({', '.join('?' * len(chunk))})"
                rows.update({r[0]: tuple(r[1:]) for r in self._execute(q, chunk)})
            missing = [i for i in ids if i not in rows]
            if missing:
                raise UnknownItemError(f"cannot fold unknown item id(s): {', '.join(map(repr, missing[:5]))}")
            bad = [f"{i!r} ({st}, {src})" for i in ids for st, src in [rows[i]] if (st, src) != ("active", "added")]
            if bad:
                raise StoreError(f"only active 'added' items can be folded; not: {', '.join(bad[:5])}")
            now = time.time()
            self._execute("UPDATE items SET source = 'folded', updated_at = ?, change_seq = ? WHERE item_id = ?",
                          [(now, self._tx_seq, i) for i in ids], many=True)
            if fold is not None:
                self._set_meta("model_fold", str(int(fold)))
        return len(ids)

    def _set_meta(self, key: str, value: str) -> None:
        if self._execute("SELECT 1 FROM meta WHERE key = ?", (key,)):
            self._execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        else:
            self._execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _existing(self, ids: Iterable[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(list(ids)):
            q = f"SELECT item_id, status FROM items WHERE item_id IN ({', '.join('?' * len(chunk))})"
            out.update({r[0]: r[1] for r in self._execute(q, chunk)})
        return out

    # -- reads --------------------------------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._execute(sql, params)

    def get(self, item_id: str) -> StoredItem:
        """The item's row (active or deleted); UnknownItemError if it was never stored."""
        rows = self._query(f"SELECT {_COLUMNS} FROM items WHERE item_id = ?", (item_id,))
        if not rows:
            raise UnknownItemError(f"unknown item id: {item_id!r}")
        return self._row(rows[0])

    def __contains__(self, item_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM items WHERE item_id = ?", (item_id,)))

    def status(self, item_id: str) -> str | None:
        """'active', 'deleted', or None when the id was never stored."""
        rows = self._query("SELECT status FROM items WHERE item_id = ?", (item_id,))
        return rows[0][0] if rows else None

    def state(self) -> dict[str, int | None]:
        """The store's change sequence (last committed write) and ``model_fold`` marker (None: no fold yet)."""
        rows = dict(self._query("SELECT key, value FROM meta WHERE key IN ('change_seq', 'model_fold')"))
        return {"change_seq": int(rows.get("change_seq", 0)),
                "model_fold": int(rows["model_fold"]) if rows.get("model_fold") is not None else None}

    def change_seq(self) -> int:
        return int(self.state()["change_seq"])

    def visible_seq(self) -> int:
        """The change sequence of the last commit this connection sees (inside a write transaction: the one
        before it, as nothing else can commit until it ends)."""
        with self._lock:
            return self._tx_seq - 1 if self._tx_seq is not None else self.change_seq()

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
        yield from self._scan("seq", 0, filters, params, batch_size, errors)

    def changes(self, since: int, *, batch_size: int = 1000, errors: list | None = None) -> Iterator[StoredItem]:
        """Every row written by a transaction with change sequence > ``since`` (its latest state), in change
        order; ``errors`` as in ``iterate``. Inside ``transaction()`` this is everything other writers committed."""
        yield from self._scan("change_seq", int(since), [], [], batch_size, errors, tie="seq")

    def _scan(self, order: str, last: int, filters: list, params: list, batch_size: int, errors,
              tie: str | None = None) -> Iterator[StoredItem]:
        key = f"{order}, {tie}" if tie else order
        where, args = f"{order} > ?", [last]
        while True:
            rows = self._query(f"SELECT {order}, {tie or order}, {_COLUMNS} FROM items WHERE "
                               f"{' AND '.join([where, *filters])} ORDER BY {key} LIMIT ?", (*args, *params, batch_size))
            if not rows:
                return
            for row in rows:
                try:
                    item = self._row(row[2:])
                except (StoreCorruptError, ValueError, TypeError) as exc:  # bad JSON, embedding size, identifier
                    reason = str(exc) if isinstance(exc, StoreCorruptError) else f"row cannot be decoded: {exc}"
                    if errors is None:
                        raise StoreCorruptError(f"item {row[2]!r}: {reason}") from None
                    errors.append((row[2], reason))
                    continue
                yield item
            if tie:  # rows of one transaction share a change sequence: page by (change_seq, seq)
                where, args = f"({order} > ? OR ({order} = ? AND {tie} > ?))", [rows[-1][0], rows[-1][0], rows[-1][1]]
            else:
                args = [rows[-1][0]]

    def list_active(self, *, source: str | None = None) -> list[StoredItem]:
        return list(self.iterate(status="active", source=source))

    def deleted_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT item_id FROM items WHERE status = 'deleted'")}

    def count(self, *, status: str | None = "active", source: str | None = None) -> int:
        where, params = _filters(status, source)
        q = "SELECT COUNT(*) FROM items" + (f" WHERE {' AND '.join(where)}" if where else "")
        return int(self._query(q, params)[0][0])

    def __len__(self) -> int:
        return self.count(status="active")

    @staticmethod
    def _row(row: tuple) -> StoredItem:
        (item_id, modality, media, captions, metadata, blob, dim, ident, status, source, created, updated) = row
        emb = None
        if blob is not None:
            emb = np.frombuffer(bytes(blob), dtype="<f4").astype(np.float32)
            if emb.size != dim:
                raise StoreCorruptError(f"item {item_id!r}: embedding has {emb.size} values, expected {dim}")
        return StoredItem(item_id=item_id, modality=modality, media=media, captions=json.loads(captions),
                          metadata=json.loads(metadata), embedding=emb,
                          identifier=tuple(json.loads(ident)) if ident is not None else None,
                          status=status, source=source, created_at=float(created), updated_at=float(updated))

    # -- cross-replica coordination -----------------------------------------------------------------------
    @contextlib.contextmanager
    def reload_slot(self):
        """Yields True when this process may reload its model now (no other replica of the run is reloading),
        else False; the slot is released when the block ends (or the process dies)."""
        raise NotImplementedError
