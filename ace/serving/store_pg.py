"""The item store on PostgreSQL (psycopg 3): one database shared by every serving replica of a run.

    store = PostgresItemStore("postgresql://ace@db.example/ace_demo")   # or ?host=/run/postgresql for a socket

Same tables and operations as the SQLite store (``ace/serving/store_base.py``): ``meta`` (schema version,
change sequence, fold marker) and ``items`` (``item_id`` and ``identifier`` UNIQUE). A write transaction
starts by bumping the change-sequence row, whose row lock serialises writers across replicas until
commit, so identifiers are assigned from the current table and change-sequence order is commit order.
A replica killed mid-transaction leaves nothing: PostgreSQL rolls the open transaction back when the
connection drops. Use one database (or one schema, ``options=-csearch_path=...``) per run.

Install: ``pip install "psycopg[binary]"`` (the project's ``postgres`` extra).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import zlib
from typing import Sequence

from ace.serving.store_base import BaseItemStore, StoreCorruptError, StoreError

log = logging.getLogger("ace.serving.store_pg")
SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq BIGSERIAL PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    media TEXT,
    captions TEXT NOT NULL,
    metadata TEXT NOT NULL,
    embedding BYTEA,
    embedding_dim INTEGER,
    identifier TEXT UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('active', 'deleted')),
    source TEXT NOT NULL CHECK (source IN ('trained', 'added', 'folded')),
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    change_seq BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_status ON items (status, source);
CREATE INDEX IF NOT EXISTS items_change ON items (change_seq, seq);
INSERT INTO meta (key, value) VALUES ('schema_version', '3'), ('change_seq', '0') ON CONFLICT (key) DO NOTHING
"""


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError('store.url is postgresql://... but psycopg is not installed: pip install "psycopg[binary]" '
                         '(or the project\'s extra: pip install -e ".[postgres]")') from None
    return psycopg


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    if "://" not in url or "@" not in url.split("://", 1)[1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.split("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url


class PostgresItemStore(BaseItemStore):
    """Item store on a PostgreSQL database; thread-safe (one connection behind a lock)."""

    backend = "postgresql"

    def __init__(self, url: str, *, connect_timeout: float = 10.0):
        super().__init__()
        psycopg = _psycopg()
        self.url = url
        self.integrity_errors = (psycopg.errors.UniqueViolation,)
        self._errors = (psycopg.Error,)
        self._slot_lock = threading.Lock()
        self._connect_timeout = max(1, int(connect_timeout))
        self._in_tx = False
        self._connect()
        try:
            with self._conn.transaction():
                # one schema creator at a time (CREATE ... IF NOT EXISTS races between replicas starting at once)
                self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key("schema"),))
                self._cur.execute(_SCHEMA)
            row = self._execute("SELECT value FROM meta WHERE key = 'schema_version'")
        except psycopg.Error as exc:
            self._conn.close()
            raise StoreCorruptError(f"{redact(url)} is not a usable ACE item store: {str(exc).strip()}") from None
        if not row or row[0][0] != str(SCHEMA_VERSION):
            self._conn.close()
            raise StoreCorruptError(f"{redact(url)}: schema version {row[0][0] if row else None!r}, expected {SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"PostgresItemStore({redact(self.url)})"

    def _connect(self) -> None:
        psycopg = _psycopg()
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the item store {redact(self.url)}: {str(exc).strip()}") from None
        self._cur = self._conn.cursor()

    def _reconnect_if_lost(self) -> None:
        """Outside a transaction, a connection the server dropped (a restart, a failover) is opened again."""
        if not self._in_tx and (self._conn.closed or self._conn.broken):
            log.warning("item store %s: connection lost; reconnecting", redact(self.url))
            self._connect()

    def _lock_key(self, name: str) -> int:
        """A 32-bit advisory-lock key for ``name`` in this database."""
        return zlib.crc32(f"ace-item-store:{name}".encode())

    # -- the connection -----------------------------------------------------------------------------------
    def _execute(self, sql: str, params: Sequence = (), *, many: bool = False) -> list[tuple]:
        sql = sql.replace("?", "%s")
        self._reconnect_if_lost()
        if many:
            self._cur.executemany(sql, list(params))
            return []
        self._cur.execute(sql, tuple(params))
        return self._cur.fetchall() if self._cur.description is not None else []

    def _begin(self) -> None:
        self._reconnect_if_lost()
        self._cur.execute("BEGIN")
        self._in_tx = True

    def _commit(self) -> None:
        self._cur.execute("COMMIT")
        self._in_tx = False

    def _rollback(self) -> None:
        self._in_tx = False
        with contextlib.suppress(*self._errors):
            self._cur.execute("ROLLBACK")

    @contextlib.contextmanager
    def reload_slot(self):
        """True while this replica holds the run's reload advisory lock: one replica reloads at a time."""
        with self._slot_lock:
            with self._lock:
                got = bool(self._execute("SELECT pg_try_advisory_lock(?)", (self._lock_key("reload"),))[0][0])
            try:
                yield got
            finally:
                if got:
                    with self._lock:
                        self._execute("SELECT pg_advisory_unlock(?)", (self._lock_key("reload"),))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
