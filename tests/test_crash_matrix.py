"""Issue 18: kill -9 at random points while the server or the items CLI adds and deletes items and while
``train.py fold`` folds them; and two writers (the CLI and a running server) racing for 200 adds.

After every kill the run loads (``Retriever.from_run``; the next server round is also a restart), the
store passes SQLite's integrity check, every acknowledged write is there as acknowledged (added items
with the identifier they were given, deleted ones gone), each write transaction is all or none, the
items served are exactly the trained items plus the acknowledged adds minus the acknowledged deletes
(a write the kill cut off before its answer may have landed or not: as a whole), and no two items share
an identifier.

Cheap by construction: one tiny trained run (``base_run`` in conftest) copied per test; commands run in
children forked from one pre-imported Python (tests/fork_server.py: the same ``main(argv)`` as
``python -m ace.serving.items``, ``python serve.py``, ``python train.py fold``, without seconds of
start-up per process). Kill points come from ``random.Random(CRASH_SEED)`` (default 18; set the
environment variable to replay another matrix): a delay after the first acknowledged HTTP write for the
server, and for the CLI and the fold a fraction of a calibration run's duration (the first add, delete
and fold of the test run to the end), half of the CLI's inside its write phase.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ace.serving.retriever import ItemNotFoundError, Retriever
from ace.serving.store import ItemStore
from tests.conftest import ITEMS_DIM as DIM
from tests.fork_server import ForkServer
from tests.serving_support import free_port

KEY = {"X-API-Key": "k3y"}
CRASH_SEED = int(os.environ.get("CRASH_SEED", "18"))
KILLED = -signal.SIGKILL
FOLD = ["gate=false", "steps=30", "batch_size=32", "lr=3e-3", "warmup_steps=5", "min_replay=60", "checkpoint_every=10",
        "num_beams=5", "top_k=5", "eval_batch_size=50", "eval_queries=20", "device=cpu"]


@pytest.fixture(scope="module")
def forks():
    fs = ForkServer(env={**os.environ, "OMP_NUM_THREADS": "1", "ACE_API_KEY": "k3y"})
    try:
        yield fs
    finally:
        fs.close()


class Ledger:
    """What the writers were told. ``acked``: item id -> identifier of every acknowledged add; ``deleted``:
    acknowledged deletes; ``cut``: writes the kill cut off before their answer (transactions of item ids
    that may or may not have been committed, each as a whole; deletes as one transaction)."""

    def __init__(self, trained: list[str]):
        self.trained = set(trained)
        self.acked: dict[str, tuple[int, ...]] = {}
        self.deleted: set[str] = set()
        self.cut_adds: list[list[str]] = []
        self.cut_deletes: list[list[str]] = []
        self.transactions: list[list[str]] = []   # every add transaction sent (acknowledged or not)
        self.mid_write = 0                         # CLI adds killed after some of their transactions committed

    def live(self) -> list[str]:
        """Items certainly live (never the subject of a cut-off write)."""
        unsure = {i for t in self.cut_adds + self.cut_deletes for i in t}
        return sorted((self.trained | set(self.acked)) - self.deleted - unsure)

    def expected(self, stored: set[str], deleted_in_store: set[str]) -> set[str]:
        """The live items the run must serve, resolving each cut-off write (all or none) from the store."""
        added = set(self.acked) | {i for t in self.cut_adds if set(t) <= stored for i in t}
        gone = self.deleted | {i for t in self.cut_deletes if set(t) <= deleted_in_store for i in t}
        return (self.trained | added) - gone


def embedding(rng: np.random.Generator, base: np.ndarray) -> list[float]:
    """Near one of a few base vectors: many items share an identifier prefix, so only u tells them apart."""
    return (base[rng.integers(len(base))] + 1e-3 * rng.standard_normal(DIM)).tolist()


def victims(ledger: Ledger, rng, n: int) -> list[str]:
    """n live items to delete: added ones, or (one draw in four, or when too few are added) trained ones."""
    live = ledger.live()
    added = [i for i in live if i not in ledger.trained]
    pool = added if len(added) >= n and rng.random() >= 0.25 else live
    return [str(v) for v in rng.choice(pool, size=n, replace=False)]


def new_items(rng, base, name: str, n: int) -> list[dict]:
    return [{"item_id": f"{name}/{j}", "modality": "image", "embedding": embedding(rng, base),
             "captions": [f"item {j} of {name}", f"batch {name} number {j}"]} for j in range(n)]  # fold queries


def check_run(run: Path, ledger: Ledger, text_encoder, *, add: list[dict] | None = None) -> None:
    """The run after a kill: whole, loadable, every acknowledged write there, nothing else. ``add``: items
    then added through the loaded retriever (an acknowledged write of the library API)."""
    with ItemStore(run / "store.sqlite") as store:
        assert store.pragma("integrity_check") == "ok"
        rows = list(store.iterate(status=None))
    stored = {row.item_id for row in rows if row.source != "trained"}
    deleted_in_store = {row.item_id for row in rows if row.status == "deleted"}
    for t in ledger.transactions:  # all or none of each add transaction
        assert len(set(t) & stored) in (0, len(t)), ("half a transaction stored", t, sorted(set(t) & stored))
    for t in ledger.cut_deletes:
        assert len(set(t) & deleted_in_store) in (0, len(t)), ("half a delete stored", t)
    expected = ledger.expected(stored, deleted_in_store)
    r = Retriever.from_run(run, device="cpu", text_encoder=text_encoder)
    try:
        assert not r.info().get("quarantined", {}).get("count"), r.info().get("quarantined")
        served = set(r.id_tokenizer.trie.item_ids)
        assert served == expected, {"served, not acknowledged": sorted(served - expected)[:5],
                                    "acknowledged, not served": sorted(expected - served)[:5]}
        assert r.info()["items"] == len(expected)
        for item_id, ident in ledger.acked.items():
            if item_id in expected:
                assert r.item(item_id).item_id == item_id
                assert tuple(r.id_tokenizer.codes_of([item_id])[0].tolist()) == ident, item_id
        for item_id in ledger.deleted:
            with pytest.raises(ItemNotFoundError):
                r.item(item_id)
        codes = [tuple(c) for c in r.id_tokenizer.codes.tolist()]
        assert len(codes) == len(set(codes)), "two items share an identifier"
        assert r.search(["item 1 of a batch"], k=3)[0], "the loaded run answers no search"
        if add:
            from ace.serving.schemas import items_from_json
            for row, ident in zip(add, r.add_items([it for row in add for it in items_from_json(row)])):
                ledger.acked[row["item_id"]] = tuple(ident)
            ledger.transactions.append([row["item_id"] for row in add])
    finally:
        r.close()


def start_server(forks: ForkServer, run: Path) -> tuple[int, str]:
    port = free_port()
    log = run.parent / "server.log"
    pid = forks.start("serve", ["--run", run, "--port", port, "--device", "cpu", "--log-level", "warning",
                                "max_wait_ms=1"], log, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        code = forks.wait(pid, 0.05)
        if code is not None:
            pytest.fail(f"the server exited with {code}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return pid, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            forks.kill(pid)
            pytest.fail(f"the server did not answer /health in 180 s:\n{log.read_text()[-3000:]}")


def server_round(forks, run: Path, ledger: Ledger, rng, base, tag: str, delay: float) -> None:
    """HTTP add transactions (4 items) and deletes (trained or added items) until SIGKILL, ``delay`` s after
    the first acknowledgement."""
    pid, url = start_server(forks, run)
    killer = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))  # pid not reaped yet: still our child
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for n in range(100_000):
                victim, batch = None, []
                try:
                    if n % 3 == 2 and ledger.live():
                        victim = victims(ledger, rng, 1)[0]
                        res = c.delete(f"/items/{victim}", headers=KEY)
                        assert res.status_code == 200, res.text
                        ledger.deleted.add(victim)
                    else:
                        batch = new_items(rng, base, f"{tag}b{n}", 4)
                        ledger.transactions.append([it["item_id"] for it in batch])
                        res = c.post("/items", headers=KEY, json={"items": batch})
                        assert res.status_code == 201, res.text
                        for it, got in zip(batch, res.json()["items"]):
                            assert got["item_id"] == it["item_id"]
                            ledger.acked[it["item_id"]] = tuple(got["identifier"])
                except httpx.TransportError:  # the kill cut this request off
                    if victim:
                        ledger.cut_deletes.append([victim])
                    else:
                        ledger.cut_adds.append([it["item_id"] for it in batch])
                    break
                if n == 0:
                    killer.start()
        assert forks.wait(pid, 60) == KILLED
    finally:
        killer.cancel()
        if forks.wait(pid) is None:
            forks.kill(pid)


def cli_round(forks, run: Path, ledger: Ledger, rng, base, tag: str, draw: random.Random,
              timing: dict) -> bool:
    """``python -m ace.serving.items add`` (24 items, transactions of 3) or ``delete`` (3 live items), killed
    at a point drawn from ``timing`` (its calibration run's duration and first acknowledgement; no kill
    while a kind is not calibrated yet). True when the kill landed before the command finished."""
    delete = len(ledger.live()) >= 3 and ("delete" not in timing or ("add" in timing and draw.random() < 0.4))
    kind = "delete" if delete else "add"
    out, err = run.parent / f"{tag}.out", run.parent / f"{tag}.err"
    out.touch()
    if delete:
        gone = victims(ledger, rng, 3)
        argv = ["delete", "--run", run, *gone]
    else:
        rows = new_items(rng, base, tag, 24)
        path = run.parent / f"{tag}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        txs = [[row["item_id"] for row in rows[s:s + 3]] for s in range(0, 24, 3)]
        ledger.transactions += txs
        argv = ["add", "--run", run, "--file", path, "--batch-size", "3", "--quiet"]
    t0 = time.monotonic()
    pid = forks.start("items", argv, out, err)
    if kind in timing:
        total, first, last = timing[kind]
        if kind == "add" and draw.random() < 0.5:  # inside its write phase: between its first and last acknowledgement
            while (code := forks.wait(pid, 0.005)) is None and not out.stat().st_size:
                pass
            if code is None:
                code = forks.wait(pid, draw.uniform(0.0, 0.8 * (last - first)))
        else:  # anywhere in its life (mostly loading the run)
            code = forks.wait(pid, draw.uniform(0.0, total))
        if code is None:
            code = forks.kill(pid)
    else:
        acks, size = [], 0  # seconds to each growth of the output: the write phase (acknowledgements)
        while (code := forks.wait(pid, 0.005)) is None:
            if out.stat().st_size > size:
                acks.append(time.monotonic() - t0)
                size = out.stat().st_size
        total = time.monotonic() - t0
        timing[kind] = (total, *((acks[0], acks[-1]) if acks else (total, total)))
    killed = code == KILLED
    assert killed or code == 0, err.read_text()[-3000:]
    if delete:
        if killed:
            ledger.cut_deletes.append(gone)
        else:
            ledger.deleted.update(gone)
    else:
        lines = out.read_text().split("\n")
        for line in lines[:-1]:  # complete lines only: each printed after its transaction committed
            row = json.loads(line)
            ledger.acked[row["item_id"]] = tuple(row["identifier"])
        cut = [t for t in txs if not set(t) <= set(ledger.acked)]
        assert killed or not cut, "a CLI add that exited 0 did not acknowledge every item"
        ledger.mid_write += 0 < len(cut) < len(txs)
        ledger.cut_adds += cut
    return killed


def fold_round(forks, run: Path, tag: str, kill_at: float | None) -> tuple[bool, float]:
    """``train.py fold``, SIGKILLed ``kill_at`` s after its start (None: let it finish); (killed, seconds)."""
    out, err = run.parent / f"{tag}.out", run.parent / f"{tag}.err"
    t0 = time.monotonic()
    pid = forks.start("train", ["fold", "--run", run, "--quiet", *FOLD], out, err)
    code = forks.wait(pid, kill_at if kill_at is not None else 600)
    if code is None:
        code = forks.kill(pid) if kill_at is not None else pytest.fail("fold still running after 600 s")
    assert code in (0, KILLED), err.read_text()[-3000:]
    return code == KILLED, time.monotonic() - t0


@pytest.mark.slow
def test_kill_9_at_random_points_during_adds_deletes_and_folds(run, text_encoder, forks):
    draw = random.Random(CRASH_SEED)
    rng = np.random.default_rng(CRASH_SEED)
    base = np.random.default_rng(0).standard_normal((3, DIM))
    r0 = Retriever.from_run(run, device="cpu", text_encoder=text_encoder)
    ledger = Ledger(list(r0.id_tokenizer.trie.item_ids))
    r0.close()
    kills = {"server": 0, "cli": 0, "fold": 0}
    t0 = time.monotonic()
    for n in range(8):  # the server, killed while a client streams adds and deletes
        server_round(forks, run, ledger, rng, base, f"s{n}", delay=draw.uniform(0.02, 1.0))
        kills["server"] += 1
        check_run(run, ledger, text_encoder)
    timing: dict = {}
    seconds = {"server": time.monotonic() - t0}
    for n in range(24):  # the CLI: after one add and one delete run to the end, killed at drawn points
        kills["cli"] += cli_round(forks, run, ledger, rng, base, f"c{n}", draw, timing)
        check_run(run, ledger, text_encoder)
        if kills["cli"] == 8:
            break
    seconds["cli"] = time.monotonic() - t0 - seconds["server"]
    killed, fold_s = fold_round(forks, run, "f0", None)  # calibration: folds every added item
    assert not killed
    check_run(run, ledger, text_encoder, add=new_items(rng, base, "to-fold", 12))
    for n in range(1, 15):  # folds killed at any phase; each resumes or rolls the previous one forward
        killed, took = fold_round(forks, run, f"f{n}", draw.uniform(0.05, 0.7) * fold_s)
        kills["fold"] += killed
        check_run(run, ledger, text_encoder)
        if not killed:  # it finished first: the next kills scale with this fold (12 items, not the first's)
            fold_s = took
            check_run(run, ledger, text_encoder, add=new_items(rng, base, f"to-fold{n}", 12))
        if kills["fold"] == 5:
            break
    assert not fold_round(forks, run, "last", None)[0]  # a fold left alone completes
    check_run(run, ledger, text_encoder)
    with ItemStore(run / "store.sqlite") as store:
        assert not [row.item_id for row in store.iterate(status="active") if row.source == "added"]  # all folded
    seconds["fold"] = time.monotonic() - t0 - seconds["server"] - seconds["cli"]
    print(f"crash matrix (CRASH_SEED={CRASH_SEED}): kills {kills} ({ledger.mid_write} CLI adds between two of their "
          f"transactions), {len(ledger.acked)} adds and {len(ledger.deleted)} deletes acknowledged, "
          f"{len(ledger.cut_adds) + len(ledger.cut_deletes)} writes cut off; seconds per part (with checks) "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    assert sum(kills.values()) >= 20 and min(kills.values()) >= 5, kills
    assert len(ledger.acked) > 50 and len(ledger.deleted) > 5 and ledger.cut_adds, (len(ledger.acked), ledger.deleted)


@pytest.mark.slow
def test_cli_and_server_racing_for_200_adds_never_duplicate_identifiers(run, text_encoder, forks):
    """Two CLI adds (50 items each) and 100 HTTP adds at once: the writers take turns, no duplicate identifier."""
    rng = np.random.default_rng(CRASH_SEED)
    base = np.random.default_rng(0).standard_normal((2, DIM))  # two prefixes for 200 items: u must be unique
    pid, url = start_server(forks, run)
    acked: dict[str, list[int]] = {}
    http_errors: list[str] = []

    def http_adds():
        with httpx.Client(base_url=url, timeout=60) as c:
            for n in range(100):
                res = c.post("/items", headers=KEY, json={"item_id": f"http/{n}", "modality": "image",
                                                          "embedding": embedding(rng, base)})
                if res.status_code == 201:
                    acked[f"http/{n}"] = res.json()["items"][0]["identifier"]
                else:
                    http_errors.append(res.text)

    files = []
    for b in range(2):
        path = run.parent / f"race{b}.jsonl"
        path.write_text("".join(json.dumps({"item_id": f"cli/{b}/{j}", "modality": "image",
                                            "embedding": embedding(rng, base)}) + "\n" for j in range(50)))
        files.append(path)
    try:
        thread = threading.Thread(target=http_adds)
        thread.start()
        clis = [forks.start("items", ["add", "--run", run, "--file", f, "--quiet"], run.parent / f"race{b}.out",
                            run.parent / f"race{b}.err") for b, f in enumerate(files)]
        cli_errors = []
        for b, p in enumerate(clis):
            if forks.wait(p, 600) == 0:
                for row in map(json.loads, (run.parent / f"race{b}.out").read_text().splitlines()):
                    acked[row["item_id"]] = row["identifier"]
            else:
                cli_errors.append((run.parent / f"race{b}.err").read_text()[-2000:])
        thread.join(600)
    finally:
        forks.kill(pid)
    assert not http_errors and not cli_errors, (http_errors[:3], cli_errors[:3])  # the writers cooperate
    assert len(acked) == 200
    idents = [tuple(v) for v in acked.values()]
    assert len(set(idents)) == 200, "duplicate identifiers were acknowledged"
    r = Retriever.from_run(run, device="cpu", text_encoder=text_encoder)  # restart: all there, as acknowledged
    try:
        assert not r.info().get("quarantined", {}).get("count")
        for item_id, ident in acked.items():
            assert r.id_tokenizer.codes_of([item_id])[0].tolist() == ident
    finally:
        r.close()
