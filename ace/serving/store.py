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

This is the embedded default of ``store.url`` (``sqlite:///RUN/store.sqlite``); ``open_item_store``
opens either backend from a URL (``postgresql://...``: ``ace/serving/store_pg.py``, for serving
replicas that share one store). The operations and the change sequence are ``ace/serving/store_base.py``'s.

Schema version 2 added the "folded" source, version 3 the change sequence (``items.change_seq``, the
``meta`` counter) and identifiers unique in the store; older files are migrated in place on open, in
one transaction.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Sequence

from ace.run_folder import LockBusy, RunPaths, take_lock
from ace.serving.store_base import (_COLUMNS, SOURCES, STATUSES, BaseItemStore, DuplicateItemError,  # noqa: F401 (API)
                                    IdentifierConflictError, StoreCorruptError, StoredItem, StoreError,
                                    UnknownItemError, check_item)

log = logging.getLogger("ace.serving.store")
SCHEMA_VERSION = 3
STORE_URL_ENV = "ACE_STORE_URL"

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


class ItemStore(BaseItemStore):
    """SQLite item store in WAL mode; thread-safe (one connection behind a lock)."""

    backend = "sqlite"
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path, *, create: bool = True):
        super().__init__()
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"item store not found: {self.path}")
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"item store path is not a file: {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def __repr__(self) -> str:
        return f"ItemStore(sqlite:///{self.path})"

    # -- the connection -----------------------------------------------------------------------------------
    def _execute(self, sql: str, params: Sequence = (), *, many: bool = False) -> list[tuple]:
        if many:
            self._conn.executemany(sql, params)
            return []
        return self._conn.execute(sql, tuple(params)).fetchall()

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        self._conn.execute("ROLLBACK")

    # -- schema -------------------------------------------------------------------------------------------
    def _init_schema(self) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and not {"meta", "items"} <= tables:
            raise StoreCorruptError(f"{self.path} is an SQLite file but not an ACE item store (tables: {sorted(tables)})")
        for step, needed in ((self._create, not tables), (self._migrate_v1, "1"), (self._migrate_v2, "2")):
            if needed is True or (needed and self._schema_version() == needed):
                self._conn.execute("BEGIN IMMEDIATE")  # each step re-checks inside: another process may have done it
                try:
                    step()
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        version = self._schema_version()
        if version != str(SCHEMA_VERSION):
            raise StoreCorruptError(f"{self.path}: schema version {version!r}, expected {SCHEMA_VERSION}")

    def _schema_version(self) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return row[0] if row else None

    def _create(self) -> None:
        """A new file: the version-2 tables, then migrated to the current version like an old file."""
        if self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            return
        for stmt in _SCHEMA.strip().split(";"):
            if stmt.strip():
                self._conn.execute(stmt)
        self._conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '2')")
        self._migrate_v2()

    def _migrate_v1(self) -> None:
        """Version 1 -> 2: rebuild the items table with the "folded" source allowed."""
        if self._schema_version() != "1":
            return
        self._conn.execute(_ITEMS_TABLE.format(table="items_v2"))
        self._conn.execute(f"INSERT INTO items_v2 (seq, {_COLUMNS}) SELECT seq, {_COLUMNS} FROM items ORDER BY seq")
        self._conn.execute("DROP TABLE items")
        self._conn.execute("ALTER TABLE items_v2 RENAME TO items")
        self._conn.execute("CREATE INDEX IF NOT EXISTS items_status ON items (status, source)")
        self._conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")

    def _migrate_v2(self) -> None:
        """Version 2 -> 3: the change sequence (every existing row: its insertion order) and unique identifiers
        (skipped, with a warning, when rows written before version 3 share one: those rows are quarantined at load)."""
        if self._schema_version() != "2":
            return
        self._conn.execute("ALTER TABLE items ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0")
        self._conn.execute("UPDATE items SET change_seq = seq")
        self._conn.execute("CREATE INDEX IF NOT EXISTS items_change ON items (change_seq, seq)")
        clash = self._conn.execute("SELECT identifier FROM items WHERE identifier IS NOT NULL "
                                   "GROUP BY identifier HAVING COUNT(*) > 1 LIMIT 1").fetchone()
        if clash is None:
            self._conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS items_identifier ON items (identifier)")
        else:
            log.warning("%s: rows share identifier %s; no unique index on identifiers", self.path, clash[0])
        top = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM items").fetchone()[0]
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('change_seq', ?)", (str(top),))
        self._conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    # -- SQLite only ----------------------------------------------------------------------------------------
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

    @contextlib.contextmanager
    def reload_slot(self):
        """True while this process holds RUN/reload.lock (beside the store file): one replica reloads at a time."""
        try:
            lock = take_lock(RunPaths(self.path.parent).reload_lock)
        except LockBusy:
            yield False
            return
        with lock:
            yield True

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# -- URLs ----------------------------------------------------------------------------------------------------

def resolve_store_url(run_dir: str | Path | None, url: str | None = None) -> str:
    """The item store of a run: ``url`` when given, else $ACE_STORE_URL, else ``sqlite:///RUN/store.sqlite``."""
    url = url or os.environ.get(STORE_URL_ENV) or None
    if url:
        return url
    if run_dir is None:
        raise StoreError("no item store: give a store URL (sqlite:///path or postgresql://...) or a run folder")
    return f"sqlite:///{Path(run_dir).resolve() / RunPaths.STORE}"


def store_backend(url: str) -> str:
    """'sqlite' or 'postgresql' for a store URL; StoreError naming the URL's scheme otherwise."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise StoreError(f"store.url must start with sqlite:/// or postgresql://, got scheme {scheme or url[:20]!r}")


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///path`` URL (``sqlite:////abs/path`` and ``sqlite:///rel/path`` both work)."""
    rest = url.split("://", 1)[1]
    if not rest.startswith("/") or rest == "/":
        raise StoreError(f"a SQLite store URL is sqlite:///path/to/store.sqlite, got {url!r}")
    return Path(rest[1:])


def store_exists(url: str) -> bool:
    """Whether opening the store would find one (a PostgreSQL store always exists: its tables are created on open)."""
    return store_backend(url) != "sqlite" or sqlite_path(url).is_file()


def open_run_store(run_dir: str | Path, url: str | None = None) -> BaseItemStore | None:
    """The item store of a run (``resolve_store_url``), or None when it is a SQLite file never written."""
    url = resolve_store_url(run_dir, url)
    return open_item_store(url) if store_exists(url) else None


def open_item_store(url: str, *, create: bool = True) -> BaseItemStore:
    """The item store at ``url``: ``sqlite:///path`` (ItemStore) or ``postgresql://...`` (PostgresItemStore)."""
    if store_backend(url) == "sqlite":
        return ItemStore(sqlite_path(url), create=create)
    from ace.serving.store_pg import PostgresItemStore

    return PostgresItemStore(url)
