"""The item store: atomic batches, clear errors, durability across reopen and across SIGKILL; the tests of
the store's operations run on both backends (SQLite, and PostgreSQL started by tests/pg_support.py)."""
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ace.data.corpus import CorpusItem
from ace.serving.store import (DuplicateItemError, IdentifierConflictError, ItemStore, StoreCorruptError,
                               StoreError, UnknownItemError, open_item_store)

ROOT = Path(__file__).resolve().parents[1]


def _item(i: int, modality: str = "image", dim: int = 4) -> CorpusItem:
    emb = np.arange(dim, dtype=np.float32) + i
    return CorpusItem(item_id=f"x{i}", modality=modality, media=f"media/x{i}.jpg", embedding=emb,
                      captions=[f"caption {i}"], metadata={"n": i})


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """Opens the store under test (again: the same one); closes every store opened when the test ends."""
    url = (f"sqlite:///{tmp_path / 's.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("pg_url"))
    opened = []

    def opener():
        opened.append(open_item_store(url))
        return opened[-1]

    yield opener
    for store in opened:
        store.close()


def test_wal_mode_and_full_sync(tmp_path):
    with ItemStore(tmp_path / "store.sqlite") as store:
        assert store.pragma("journal_mode") == "wal"
        assert store.pragma("synchronous") == 2  # FULL


def test_add_get_list_roundtrip(open_store):
    with open_store() as store:
        assert store.add([_item(0), _item(1, "audio")], identifiers=[(1, 2, 3, 0), (1, 2, 3, 1)]) == 2
        got = store.get("x1")
        assert got.modality == "audio" and got.captions == ["caption 1"] and got.metadata == {"n": 1}
        assert got.identifier == (1, 2, 3, 1) and got.source == "added" and got.status == "active"
        np.testing.assert_array_equal(got.embedding, np.arange(4, dtype=np.float32) + 1)
        assert [it.item_id for it in store.list_active()] == ["x0", "x1"]
        assert got.to_corpus_item().media == "media/x1.jpg"
        assert len(store) == 2 and "x0" in store and "nope" not in store


def test_duplicate_aborts_whole_batch(open_store):
    with open_store() as store:
        store.add([_item(0)])
        with pytest.raises(DuplicateItemError, match="'x0'"):
            store.add([_item(5), _item(0)])
        assert "x5" not in store  # nothing of the failed batch was written
        with pytest.raises(DuplicateItemError, match="twice in one batch"):
            store.add([_item(7), _item(7)])
        assert "x7" not in store


def test_delete_and_errors(open_store):
    with open_store() as store:
        store.add([_item(0), _item(1)])
        store.add([CorpusItem("t0", "video")], source="trained")
        with pytest.raises(UnknownItemError, match="'ghost'"):
            store.delete(["x0", "ghost"])
        assert store.status("x0") == "active"  # the failed call deleted nothing
        assert store.delete(["x0", "t0"]) == 2
        assert store.deleted_ids() == {"x0", "t0"}
        assert [it.item_id for it in store.list_active()] == ["x1"]
        with pytest.raises(UnknownItemError, match="already deleted"):
            store.delete(["x0"])
        with pytest.raises(DuplicateItemError, match="never reused"):
            store.add([_item(0)])
        with pytest.raises(UnknownItemError, match="unknown item id"):
            store.get("ghost")
        assert store.get("x0").status == "deleted"


def test_bad_items_rejected(open_store):
    with open_store() as store:
        bad_emb = _item(0)
        bad_emb.embedding = np.array([1.0, np.nan], dtype=np.float32)
        with pytest.raises(StoreError, match="NaN"):
            store.add([bad_emb])
        with pytest.raises(StoreError, match="modality"):
            store.add([CorpusItem("y", "smell")])
        with pytest.raises(StoreError, match="non-empty string"):
            store.add([CorpusItem("", "image")])
        with pytest.raises(StoreError, match="identifier"):
            store.add([_item(1)], identifiers=[(1, -2)])
        with pytest.raises(StoreError, match="2 identifiers for 1 items"):
            store.add([_item(1)], identifiers=[(1,), (2,)])
        with pytest.raises(StoreError, match="JSON"):
            store.add([CorpusItem("z", "image", metadata={"f": object()})])
        assert store.count(status=None) == 0


def test_durable_across_reopen(tmp_path):
    path = tmp_path / "s.sqlite"
    store = ItemStore(path)
    store.add([_item(i) for i in range(10)], identifiers=[(i, 0) for i in range(10)])
    store.delete(["x3"])
    store.close()
    with ItemStore(path, create=False) as again:
        assert [it.item_id for it in again.iterate(batch_size=3)] == [f"x{i}" for i in range(10) if i != 3]
        assert again.get("x9").identifier == (9, 0)
        assert again.deleted_ids() == {"x3"}


def test_corrupt_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreCorruptError, match="not a readable ACE item store"):
        ItemStore(garbage)
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE other (a)")
    con.commit()
    con.close()
    with pytest.raises(StoreCorruptError, match="not an ACE item store"):
        ItemStore(foreign)
    with pytest.raises(StoreError, match="not found"):
        ItemStore(tmp_path / "missing.sqlite", create=False)


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from ace.data.corpus import CorpusItem
    from ace.serving.store import ItemStore
    store = ItemStore(sys.argv[1])
    b = 0
    while True:
        items = [CorpusItem(f"b{b}-{j}", "image", embedding=np.full(64, b, np.float32), captions=["c"] * 20)
                 for j in range(50)]
        store.add(items)
        print(b, flush=True)  # acknowledged: the batch is committed
        b += 1
""")


def test_sigkill_loses_no_acknowledged_batch(tmp_path):
    path = tmp_path / "s.sqlite"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    acked = []
    deadline = time.monotonic() + 60
    while len(acked) < 5 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 5, "writer subprocess did not acknowledge 5 batches"
    with ItemStore(path, create=False) as store:
        ids = {it.item_id for it in store.iterate()}
    for b in acked:
        assert all(f"b{b}-{j}" in ids for j in range(50)), f"acknowledged batch {b} lost"
    batches = {i.split("-")[0] for i in ids}
    for b in batches:  # no half-written batch
        assert all(f"{b}-{j}" in ids for j in range(50)), f"batch {b} half-written"


def test_version_1_file_is_migrated_in_place(tmp_path):
    from ace.serving.store import _COLUMNS, _SCHEMA

    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    for stmt in _SCHEMA.replace("'added', 'folded'", "'added'").strip().split(";"):  # the version-1 schema
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute(f"INSERT INTO items ({_COLUMNS}) VALUES ('a', 'image', NULL, '[\"cap\"]', '{{}}', NULL, NULL, "
                 f"'[1, 2, 0]', 'active', 'added', 1.0, 1.0)")
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError):  # version 1 refuses the new source
        conn.execute("UPDATE items SET source='folded'")
    conn.close()
    with ItemStore(path) as store:
        assert store.get("a").captions == ["cap"] and store.get("a").identifier == (1, 2, 0)
        assert store.mark_folded(["a"]) == 1 and store.get("a").source == "folded"
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    conn.close()


def test_mark_folded_and_trained_tombstones(open_store):
    with open_store() as store:
        store.add([_item(0), _item(1)], identifiers=[(0, 0), (0, 1)])
        with pytest.raises(UnknownItemError, match="ghost"):
            store.mark_folded(["x0", "ghost"])
        assert store.get("x0").source == "added"  # the failed call changed nothing
        assert store.mark_folded(["x0"]) == 1
        with pytest.raises(StoreError, match="only active 'added'"):
            store.mark_folded(["x0"])
        store.delete(["x1"])
        with pytest.raises(StoreError, match="deleted"):
            store.mark_folded(["x1"])
        # a trained item is recorded as a tombstone in the same transaction as the other deletions
        trained = CorpusItem("t0", "audio", captions=["old"])
        assert store.delete(["x0", "t0"], trained=[(trained, (3, 4))]) == 2
        row = store.get("t0")
        assert (row.status, row.source, row.identifier) == ("deleted", "trained", (3, 4))
        assert store.count(status="deleted") == 3 and store.count(source="folded", status=None) == 1
        with pytest.raises(StoreError, match="not among the ids"):
            store.delete(["x9"], trained=[(CorpusItem("t1", "image"), (0, 2))])
        with pytest.raises(DuplicateItemError, match="already recorded"):
            store.delete(["t0"], trained=[(trained, (3, 4))])


def test_change_sequence_gives_every_write_of_other_connections_in_commit_order(open_store):
    writer, reader = open_store(), open_store()
    assert reader.change_seq() == 0 and list(reader.changes(0)) == []
    writer.add([_item(0), _item(1)], identifiers=[(0, 0), (0, 1)])
    seen = reader.visible_seq()
    assert seen == 1 and [(r.item_id, r.status) for r in reader.changes(0)] == [("x0", "active"), ("x1", "active")]
    writer.delete(["x0"])
    writer.mark_folded(["x1"], fold=7)
    writer.add([_item(2)], identifiers=[(0, 2)])
    # since the reader's last look: the delete, the fold (with its marker) and the add, each row once, latest state
    assert [(r.item_id, r.status, r.source) for r in reader.changes(seen)] == [
        ("x0", "deleted", "added"), ("x1", "active", "folded"), ("x2", "active", "added")]
    assert reader.state() == {"change_seq": 4, "model_fold": 7}
    with pytest.raises(UnknownItemError):
        writer.delete(["ghost"])
    assert reader.change_seq() == 4  # a failed write takes no change sequence
    assert [r.item_id for r in reader.changes(0, batch_size=1)] == ["x0", "x1", "x2"]  # paging by (change, seq)


def test_identifiers_are_unique_in_the_store(open_store):
    store = open_store()
    store.add([_item(0)], identifiers=[(1, 2, 0)])
    with pytest.raises(IdentifierConflictError, match="'x0'"):
        store.add([_item(1)], identifiers=[(1, 2, 0)])
    with pytest.raises(IdentifierConflictError, match="same identifier"):
        store.add([_item(2), _item(3)], identifiers=[(1, 2, 1), (1, 2, 1)])
    assert store.count(status=None) == 1


def test_a_write_transaction_holds_the_write_lock_from_its_start(open_store):
    """Writers on two connections: the second waits until the first commits, then sees its rows (so
    identifiers assigned inside a transaction come from the current table)."""
    import threading

    a, b = open_store(), open_store()
    order = []

    def second_writer():
        with b.transaction():
            order.append(("b", b.visible_seq(), [r.item_id for r in b.changes(0)]))

    with a.transaction():
        a.add([_item(0)], identifiers=[(0, 0)])
        t = threading.Thread(target=second_writer)
        t.start()
        time.sleep(0.3)  # b waits for the write lock meanwhile (without it, b would append first)
        order.append(("a", a._tx_seq))
    t.join(30)
    assert order == [("a", 1), ("b", 1, ["x0"])]


def test_one_replica_reloads_at_a_time(open_store):
    a, b = open_store(), open_store()
    with a.reload_slot() as first:
        with b.reload_slot() as second:
            assert (first, second) == (True, False)
    with b.reload_slot() as again:  # released when the reloading replica is done
        assert again


def test_a_postgresql_store_reconnects_after_the_server_drops_its_connection(pg_url):
    import psycopg

    with open_item_store(pg_url) as store:
        store.add([_item(0)], identifiers=[(0, 0)])
        pid = store._conn.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:  # as a server restart would
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            store.get("x0")  # the statement that finds the connection gone fails ...
        assert store.get("x0").identifier == (0, 0)  # ... the next one reconnects
        store.add([_item(1)], identifiers=[(0, 1)])
        assert store.change_seq() == 2
