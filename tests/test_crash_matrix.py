"""Issue 18: kill -9 at random points while the server or the CLI adds, deletes and folds items, and two
writers (the CLI and a running server) racing for 200 adds. After each kill the run loads, every
acknowledged write is there (adds as added or folded items, deletes as deleted ones), every stored batch
is whole, and no two items share an identifier.

Kill points are drawn from a seeded generator (``CRASH_SEED``), so a failing point can be replayed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from ace.serving.retriever import ItemNotFoundError, Retriever
from ace.serving.store import ItemStore
from tests.conftest import ITEMS_DIM as DIM
from tests.conftest import ROOT
from tests.serving_support import free_port

sys.path.insert(0, str(ROOT / "benchmarks"))
from load_test import _wait_healthy  # noqa: E402  (polls /health, fails if the process exits)

KEY = {"X-API-Key": "k3y"}
CRASH_SEED = int(os.environ.get("CRASH_SEED", "18"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACE_API_KEY": "k3y"}
FOLD = ["steps=30", "batch_size=32", "lr=3e-3", "warmup_steps=5", "min_replay=60", "checkpoint_every=10",
        "num_beams=5", "top_k=5", "eval_batch_size=50", "device=cpu"]


class Ledger:
    """What the clients were told: acknowledged adds (by batch) and deletes. A write cut off by the kill
    before its answer may or may not have been committed: its items are uncertain and left alone."""

    def __init__(self):
        self.added: dict[str, str] = {}       # item id -> batch name
        self.deleted: set[str] = set()
        self.uncertain: set[str] = set()
        self.sent: dict[str, list[str]] = {}  # every add batch sent (acknowledged or not)

    def live(self) -> list[str]:
        return [i for i in self.added if i not in self.deleted and i not in self.uncertain]


def embedding(rng: np.random.Generator, base: np.ndarray) -> list[float]:
    """Near one of a few base vectors: many items share an identifier prefix, so only u tells them apart."""
    return (base[rng.integers(len(base))] + 1e-3 * rng.standard_normal(DIM)).tolist()


def check_run(run: Path, ledger: Ledger, text_encoder) -> None:
    with ItemStore(run / "store.sqlite") as store:
        assert store.pragma("integrity_check") == "ok"
        rows = list(store.iterate(status=None))
    stored = {row.item_id for row in rows}
    for name, ids in ledger.sent.items():  # all or none of each batch
        assert len(set(ids) & stored) in (0, len(ids)), (name, sorted(set(ids) & stored))
    r = Retriever.from_run(run, device="cpu", text_encoder=text_encoder)
    try:
        assert not r.info().get("quarantined", {}).get("count"), r.info().get("quarantined")
        for item_id in ledger.live():
            assert r.item(item_id).item_id == item_id
        for item_id in ledger.deleted:
            with pytest.raises(ItemNotFoundError):
                r.item(item_id)
        codes = [tuple(c) for c in r.id_tokenizer.codes.tolist()]
        assert len(codes) == len(set(codes)), "two items share an identifier"
    finally:
        r.close()


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(run.parent / "server.log", "a")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(run), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", "max_wait_ms=1"],
                            cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, 180)
    except SystemExit as exc:
        pytest.fail(f"{exc}:\n{(run.parent / 'server.log').read_text()[-3000:]}")
    return proc, url


def kill_server_during_writes(run: Path, ledger: Ledger, rng: np.random.Generator, base: np.ndarray,
                              tag: str, delay: float) -> None:
    """A stream of add batches and deletes through HTTP; SIGKILL ``delay`` s after the first acknowledgement."""
    proc, url = start_server(run)
    killer = threading.Timer(delay, proc.kill)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for n in range(10_000):
                victim, batch = None, []
                try:
                    if n % 3 == 2 and ledger.live():
                        victim = ledger.live()[int(rng.integers(len(ledger.live())))]
                        res = c.delete(f"/items/{victim}", headers=KEY)
                        assert res.status_code == 200, res.text
                        ledger.deleted.add(victim)
                    else:
                        name = f"{tag}b{n}"
                        batch = [{"item_id": f"{name}/{j}", "modality": "image", "embedding": embedding(rng, base),
                                  "captions": [f"stream item {name} {j}"]} for j in range(4)]
                        ledger.sent[name] = [it["item_id"] for it in batch]
                        res = c.post("/items", headers=KEY, json={"items": batch})
                        assert res.status_code == 201, res.text
                        for it in batch:
                            ledger.added[it["item_id"]] = name
                except httpx.TransportError:  # killed with this request in flight
                    ledger.uncertain.update([victim] if victim else [it["item_id"] for it in batch])
                    break
                if n == 0:
                    killer.start()
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def kill_cli(run: Path, ledger: Ledger, rng: np.random.Generator, base: np.ndarray, tag: str, delay: float) -> bool:
    """``python -m ace.serving.items add`` (a batch of 25) or ``delete`` (3 live items), SIGKILLed after ``delay`` s
    (True) unless it finished first (False)."""
    if len(ledger.live()) >= 3 and rng.random() < 0.4:
        victims = [str(v) for v in rng.choice(ledger.live(), size=3, replace=False)]
        cmd, name = ["delete", "--run", str(run), *victims], None
    else:
        name = f"{tag}cli"
        rows = [{"item_id": f"{name}/{j}", "modality": "image", "embedding": embedding(rng, base),
                 "captions": [f"cli item {name} {j}"]} for j in range(25)]  # the fold's captions backend needs them
        path = run.parent / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        ledger.sent[name] = [row["item_id"] for row in rows]
        cmd = ["add", "--run", str(run), "--file", str(path), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "ace.serving.items", *cmd], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        ledger.uncertain.update(victims if name is None else ledger.sent[name])  # killed: nothing acknowledged
        return True
    assert proc.returncode == 0, err
    if name is None:
        ledger.deleted.update(victims)
    else:
        for row in map(json.loads, out.splitlines()):
            ledger.added[row["item_id"]] = name
    return False


def kill_fold(run: Path, delay: float) -> bool:
    """``train.py fold``, SIGKILLed after ``delay`` s; True when it finished first."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fold", "--run", str(run), "--quiet", *FOLD],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return False
    assert proc.returncode == 0, err
    return True


@pytest.mark.slow
def test_kill_9_at_random_points_during_adds_deletes_and_folds(run, text_encoder):
    rng = np.random.default_rng(CRASH_SEED)
    draw = random.Random(CRASH_SEED)
    base = np.random.default_rng(0).standard_normal((3, DIM))
    ledger = Ledger()
    kills = 0
    for n in range(9):  # the server, killed while a client streams adds and deletes
        kill_server_during_writes(run, ledger, rng, base, f"s{n}", delay=draw.uniform(0.05, 1.5))
        check_run(run, ledger, text_encoder)
        kills += 1
    for n in range(8):  # the CLI, killed anywhere from start-up to its commit
        kills += kill_cli(run, ledger, rng, base, f"c{n}", delay=draw.uniform(1.0, 8.0))
        check_run(run, ledger, text_encoder)
    for n in range(5):  # a fold, killed at any phase (planning, fine-tuning, swapping, marking)
        folded = kill_fold(run, delay=draw.uniform(2.0, 12.0))
        check_run(run, ledger, text_encoder)
        kills += not folded
        if folded:
            break
    assert kill_fold(run, delay=600)  # a fold left unkilled completes (resuming or rolling forward)
    check_run(run, ledger, text_encoder)
    assert kills >= 20 and len(ledger.added) > 20 and ledger.deleted, (kills, len(ledger.added), len(ledger.deleted))


@pytest.mark.slow
def test_cli_and_server_racing_for_200_adds_never_duplicate_identifiers(run, text_encoder):
    rng = np.random.default_rng(CRASH_SEED)
    base = np.random.default_rng(0).standard_normal((2, DIM))  # two prefixes for 200 items: u must be unique
    proc, url = start_server(run)
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
        clis = [subprocess.Popen([sys.executable, "-m", "ace.serving.items", "add", "--run", str(run), "--file", str(f), "--quiet"],
                                 cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for f in files]
        cli_errors = []
        for p in clis:
            out, err = p.communicate(timeout=600)
            if p.returncode == 0:
                for row in map(json.loads, out.splitlines()):
                    acked[row["item_id"]] = row["identifier"]
            else:
                cli_errors.append(err)
        thread.join(600)
    finally:
        proc.terminate()
        proc.wait(30)
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
