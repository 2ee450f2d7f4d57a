"""ItemStore: atomic batches, clear errors, durability across reopen and across SIGKILL."""
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
from ace.serving.store import (DuplicateItemError, ItemStore, StoreCorruptError, StoreError,
                       UnknownItemError)

ROOT = Path(__file__).resolve().parents[1]


def _item(i: int, modality: str = "image", dim: int = 4) -> CorpusItem:
    emb = np.arange(dim, dtype=np.float32) + i
    return CorpusItem(item_id=f"x{i}", modality=modality, media=f"media/x{i}.jpg", embedding=emb,
                      captions=[f"caption {i}"], metadata={"n": i})


def test_wal_mode_and_full_sync(tmp_path):
    with ItemStore(tmp_path / "store.sqlite") as store:
        assert store.pragma("journal_mode") == "wal"
        assert store.pragma("synchronous") == 2  # FULL


def test_add_get_list_roundtrip(tmp_path):
    with ItemStore(tmp_path / "s.sqlite") as store:
        assert store.add([_item(0), _item(1, "audio")], identifiers=[(1, 2, 3, 0), (1, 2, 3, 1)]) == 2
        got = store.get("x1")
        assert got.modality == "audio" and got.captions == ["caption 1"] and got.metadata == {"n": 1}
        assert got.identifier == (1, 2, 3, 1) and got.source == "added" and got.status == "active"
        np.testing.assert_array_equal(got.embedding, np.arange(4, dtype=np.float32) + 1)
        assert [it.item_id for it in store.list_active()] == ["x0", "x1"]
        assert got.to_corpus_item().media == "media/x1.jpg"
        assert len(store) == 2 and "x0" in store and "nope" not in store


def test_duplicate_aborts_whole_batch(tmp_path):
    with ItemStore(tmp_path / "s.sqlite") as store:
        store.add([_item(0)])
        with pytest.raises(DuplicateItemError, match="'x0'"):
            store.add([_item(5), _item(0)])
        assert "x5" not in store  # nothing of the failed batch was written
        with pytest.raises(DuplicateItemError, match="twice in one batch"):
            store.add([_item(7), _item(7)])
        assert "x7" not in store


def test_delete_and_errors(tmp_path):
    with ItemStore(tmp_path / "s.sqlite") as store:
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


def test_bad_items_rejected(tmp_path):
    with ItemStore(tmp_path / "s.sqlite") as store:
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


def test_mark_folded_and_trained_tombstones(tmp_path):
    with ItemStore(tmp_path / "store.sqlite") as store:
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
