"""Load test of the search server: N concurrent clients, M searches, loopback only, bounded in count and time.

    # a trained run: starts `serve.py --run RUN_DIR` on a free loopback port, loads it, stops it
    python benchmarks/load_test.py --run runs/demo --clients 100 --searches 10000
    # a server already running on this machine
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --queries queries.txt
    # server overhead only: a constant-cost synthetic retriever (no model)
    python benchmarks/load_test.py --overhead
    # traffic mixes against ONE server, interleaved in rounds (so machine load hits each alike)
    python benchmarks/load_test.py --run runs/demo --compare uniform 'k=1,5,10,20;modality=any,image' --rounds 3

Prints (and with --out appends as Markdown) errors, p50/p90/p99 latency, throughput, and the
server's micro-batch sizes from /stats. With --run and --direct, also the retriever's own batched
throughput (no HTTP) for comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ace.run_folder import RunPaths, read_pairs  # noqa: E402


# -- server-overhead mode: a synthetic retriever with constant cost -------------------------------

class ConstantCostRetriever:
    """Answers any query with k synthetic items (rotated by a query hash) after an optional fixed delay per batch."""

    def __init__(self, num_items: int = 1000, delay_ms: float = 0.0):
        from ace.data.corpus import CorpusItem
        self.items = [CorpusItem(f"item{i}", "image", captions=[f"synthetic item {i}"]) for i in range(num_items)]
        self.index = {it.item_id: it for it in self.items}
        self.delay_s = delay_ms / 1000.0

    def search(self, queries, k=10, num_beams=None, modality=None):
        from dataclasses import dataclass

        @dataclass
        class Hit:
            item_id: str
            modality: str
            score: float
            identifier: tuple
            source: str = "generative"

        if self.delay_s:
            time.sleep(self.delay_s)
        n = len(self.items)
        out = []
        for q in queries:
            start = sum(map(ord, q)) % n
            out.append([Hit(self.items[(start + j) % n].item_id, "image", -0.1 * j, (j % 7, j % 5, 0))
                        for j in range(min(k, n))])
        return out

    def item(self, item_id):
        try:
            return self.index[item_id]
        except KeyError:
            raise KeyError(f"unknown item id: {item_id!r}") from None

    def info(self):
        return {"items": len(self.items), "model_version": "constant-cost (server overhead only)"}


def _serve_overhead(port: int, delay_ms: float, overrides: list[str]) -> None:
    import uvicorn

    from ace.config import ServeConfig, load_config
    from ace.serving.server import create_app
    config = load_config(ServeConfig, None, overrides)
    app = create_app(ConstantCostRetriever(delay_ms=delay_ms), config)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- client side ---------------------------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    ok = host == "localhost"
    try:
        ok = ok or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not ok:
        raise SystemExit(f"load_test.py only targets loopback servers, not {host!r}")


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server at {url} not healthy after {timeout:.0f} s")


def _proc_cpu_s(proc: subprocess.Popen | int | None) -> float:
    """User+system CPU seconds of a process (a child, or a pid) so far (Linux /proc; 0 elsewhere)."""
    if proc is None:
        return 0.0
    try:
        fields = Path(f"/proc/{getattr(proc, 'pid', proc)}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def load_queries(args) -> list[str]:
    """--queries FILE, else the run's held-out test queries, else its corpus captions, else synthetic."""
    if args.queries:
        queries = [line.strip() for line in Path(args.queries).read_text().splitlines() if line.strip()]
    elif args.run and RunPaths(args.run).test_queries.is_file():  # [[query, item_id], ...] held-out queries
        queries = [q for q, _ in read_pairs(RunPaths(args.run).test_queries)]
    elif args.run and RunPaths(args.run).corpus.is_file():
        queries = []
        with open(RunPaths(args.run).corpus) as f:
            for line in f:
                queries.extend(c for c in json.loads(line).get("captions", [])[1:] if c.strip())
                if len(queries) >= args.searches:
                    break
    else:
        queries = [f"synthetic query number {i} about a dog on a beach" for i in range(1000)]
    if not queries:
        raise SystemExit("no queries: pass --queries FILE (one query a line)")
    return queries


class RawHttpClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: the load generator must cost far less than the server."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader = self.writer = None

    async def post_json(self, path: str, payload: dict) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{self.extra}\r\n").encode()
        for attempt in range(2):  # one reconnect if the server closed an idle keep-alive connection
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(head + body)
                await self.writer.drain()
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionResetError("server closed the connection")
                status = int(status_line.split()[1])
                length, close = None, False
                while True:
                    line = await self.reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                    elif name == "transfer-encoding":
                        raise RuntimeError("chunked responses are not expected from /search")
                if length is None:
                    raise RuntimeError("response without Content-Length")
                data = await self.reader.readexactly(length)
                if close:
                    await self.close()
                return status, data
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


def request_mix(spec: str | None, k: int) -> list[dict]:
    """The request fields to cycle through: ``None`` -> [{"k": k}] (uniform traffic); else a spec such as
    ``k=1,5,10,20;modality=any,image,audio,video`` -> every combination, in a fixed order (mixed traffic)."""
    if not spec:
        return [{"k": k}]
    ks, modalities = [k], [None]
    for part in spec.split(";"):
        name, _, values = part.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if name.strip() == "k" and vals:
            ks = [int(v) for v in vals]
        elif name.strip() == "modality" and vals:
            modalities = [None if v in ("any", "none") else v for v in vals]
        else:
            raise SystemExit(f"--mix: cannot read {part!r}; e.g. 'k=1,5,10,20;modality=any,image,audio,video'")
    return [{"k": kk, **({"modality": m} if m else {})} for m in modalities for kk in ks]


async def run_load(url: str, queries: list[str], *, clients: int, searches: int, k: int,
                   max_seconds: float, api_key: str | None, mix: list[dict] | None = None,
                   keep_latencies: bool = False) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_i = 0
    deadline = time.monotonic() + max_seconds
    headers = {"X-API-Key": api_key} if api_key else {}
    u = urlparse(url)
    mix = mix or [{"k": k}]

    async def worker():
        nonlocal next_i
        client = RawHttpClient(u.hostname, u.port or 80, headers)
        try:
            while next_i < searches and time.monotonic() < deadline:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(
                        client.post_json("/search", {"query": queries[i % len(queries)], **mix[i % len(mix)]}), 120)
                    if status == 200 and json.loads(data)["results"] is not None:
                        latencies.append((time.perf_counter() - t0) * 1000.0)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                except (OSError, RuntimeError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await client.close()
        finally:
            await client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    stats = httpx.get(url + "/stats", headers=headers, timeout=30).json()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"clients": clients, "searches_sent": next_i, "ok": len(latencies), "errors": errors,
            "wall_s": round(wall, 2), "throughput_qps": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p90_ms": round(float(np.percentile(lat, 90)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "stopped_by_time": next_i < searches,
            "server_batches": stats.get("batches"), "server_latency_ms": stats.get("latency_ms"),
            "model_version": stats.get("model_version"), "mix": mix, **({"latencies": latencies} if keep_latencies else {})}


def compare_mixes(url: str, proc, queries: list[str], specs: list[str], *, rounds: int, clients: int, searches: int,
                  k: int, max_seconds: float, api_key: str | None) -> list[dict]:
    """Each traffic mix (``uniform`` or a --mix spec) for searches/rounds searches per round, the mixes in
    turn, ``rounds`` times, against one server: per mix the pooled q/s, latency percentiles, server CPU
    seconds and micro-batch figures (from /stats differences), and its ratio to the first mix."""
    headers = {"X-API-Key": api_key} if api_key else {}
    acc = [{"spec": spec, "ok": 0, "wall_s": 0.0, "server_cpu_s": 0.0, "latencies": [], "errors": {}, "batches": 0,
            "queries": 0.0, "calls": 0, "loadavg": []} for spec in specs]
    per_round = max(1, searches // rounds)
    for _ in range(rounds):
        for a in acc:
            mix = request_mix(None if a["spec"] == "uniform" else a["spec"], k)
            before = httpx.get(url + "/stats", headers=headers, timeout=30).json()["batches"]
            a["loadavg"].append(os.getloadavg()[0])
            srv0 = _proc_cpu_s(proc)
            res = asyncio.run(run_load(url, queries, clients=clients, searches=per_round, k=k,
                                       max_seconds=max_seconds / (rounds * len(specs)), api_key=api_key, mix=mix,
                                       keep_latencies=True))
            a["server_cpu_s"] += _proc_cpu_s(proc) - srv0
            after = res["server_batches"]
            a["ok"] += res["ok"]
            a["wall_s"] += res["wall_s"]
            a["latencies"] += res["latencies"]
            for name, n in res["errors"].items():
                a["errors"][name] = a["errors"].get(name, 0) + n
            a["batches"] += after["count"] - before["count"]
            a["queries"] += (after["mean_size"] or 0) * after["count"] - (before["mean_size"] or 0) * before["count"]
            a["calls"] += after["retriever_calls"] - before["retriever_calls"]
            a["label"] = (f"uniform (every request k={k}, any modality)" if a["spec"] == "uniform"
                          else f"`{a['spec']}` ({len(mix)} combinations)")
    out = []
    for a in acc:
        lat = np.asarray(a.pop("latencies") or [np.nan])
        out.append({**a, "throughput_qps": round(a["ok"] / a["wall_s"], 1) if a["wall_s"] else None,
                    "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
                    "per_server_cpu_s": round(a["ok"] / a["server_cpu_s"], 1) if a["server_cpu_s"] else None,
                    "queries_per_call": round(a["queries"] / a["calls"], 1) if a["calls"] else None,
                    "loadavg": [round(x, 1) for x in a["loadavg"]]})
    for o in out:
        o["vs_first_qps"] = round(o["throughput_qps"] / out[0]["throughput_qps"], 3) if out[0]["throughput_qps"] else None
        o["vs_first_cpu"] = (round(o["per_server_cpu_s"] / out[0]["per_server_cpu_s"], 3)
                             if out[0]["per_server_cpu_s"] and o["per_server_cpu_s"] else None)
    return out


def compare_markdown(title: str, command: str, rows: list[dict], rounds: int, clients: int) -> str:
    lines = [f"### {title}", "", f"Command: `{command}`", "",
             f"One server; the mixes in turn, {rounds} rounds, {clients} clients; load average before each "
             "phase in the last column (other processes were running).", "",
             "| traffic | searches ok | errors | q/s (wall) | p50 ms | p99 ms | queries per model call | "
             "searches per server CPU-s | vs first (wall) | vs first (CPU) | load average |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ok']} | {sum(r['errors'].values())} | "
                     f"{r['throughput_qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['queries_per_call']} | "
                     f"{r['per_server_cpu_s']} | {r['vs_first_qps']} | {r['vs_first_cpu']} | "
                     f"{' / '.join(str(x) for x in r['loadavg'])} |")
    return "\n".join(lines) + "\n\n"


def direct_throughput(run: Path, queries: list[str], *, batch: int, k: int, count: int, device: str | None) -> dict:
    """The retriever's own batched throughput (no HTTP), for comparison with the served figure."""
    from ace.serving.retriever import Retriever
    retriever = Retriever.from_run(run, device=device)
    qs = [queries[i % len(queries)] for i in range(count)]
    retriever.search(qs[:batch], k=k)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(qs), batch):
        retriever.search(qs[s:s + batch], k=k)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"direct_batch": batch, "direct_queries": len(qs), "direct_qps": round(len(qs) / wall, 1),
            "direct_q_per_cpu_s": round(len(qs) / cpu, 1)}


def to_markdown(title: str, command: str, res: dict) -> str:
    b = res.get("server_batches") or {}
    lines = [f"### {title}", "", f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average at start "
             f"{res.get('loadavg')} (other engineers' processes were running).", "",
             *([f"Traffic: requests cycle through {len(res['mix'])} (k, modality) combinations: "
                + ", ".join(f"k={m['k']}/{m.get('modality', 'any')}" for m in res["mix"]) + ".", ""]
               if len(res.get("mix") or []) > 1 else []),
             "| clients | searches ok | errors | throughput (q/s) | p50 (ms) | p90 (ms) | p99 (ms) | mean batch | max batch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {res['clients']} | {res['ok']} | {sum(res['errors'].values())} {res['errors'] or ''} | "
             f"{res['throughput_qps']} | {res['p50_ms']} | {res['p90_ms']} | {res['p99_ms']} | "
             f"{b.get('mean_size')} | {b.get('max_size')} |", ""]
    if b.get("retriever_calls") and b.get("mean_size"):
        per_call = round(b["mean_size"] * b["count"] / b["retriever_calls"], 1)
        lines += [f"Retriever calls: {b['retriever_calls']} for {b['count']} micro-batches ({per_call} queries per call).", ""]
    if "server_cpu_s" in res:
        per_cpu = round(res["ok"] / res["server_cpu_s"], 1) if res["server_cpu_s"] else None
        lines += [f"CPU time: server process {res['server_cpu_s']} s ({per_cpu} searches per server CPU-second), "
                  f"load-test client {res['client_cpu_s']} s, for {res['ok']} searches in {res['wall_s']} s wall.", ""]
    if "direct_qps" in res:
        lines += [f"Retriever alone (no HTTP, same process settings), batches of {res['direct_batch']}: "
                  f"{res['direct_qps']} q/s wall, {res['direct_q_per_cpu_s']} queries per CPU-second, "
                  f"over {res['direct_queries']} queries (measured right after the load test).", ""]
    if res.get("stopped_by_time"):
        lines += [f"Stopped by the time bound after {res['searches_sent']} searches.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", type=Path, help="start serve.py on this run (loopback, free port)")
    target.add_argument("--url", help="an already running loopback server")
    target.add_argument("--overhead", action="store_true", help="server overhead only: constant-cost synthetic retriever")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--searches", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mix", default=None, help="mixed traffic: cycle request fields, e.g. "
                   "'k=1,5,10,20;modality=any,image,audio,video' (default: every request k=--k, any modality)")
    p.add_argument("--compare", nargs="+", default=None, metavar="MIX",
                   help="several traffic mixes against one server, in turn for --rounds rounds: 'uniform' (every "
                        "request k=--k) or a --mix spec; --searches per mix; ratios to the first")
    p.add_argument("--rounds", type=int, default=3, help="--compare: rounds of the mixes in turn")
    p.add_argument("--server-pid", type=int, default=None, help="--url --compare: the server's pid, to count its CPU time")
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    p.add_argument("--queries", type=Path, help="file of queries, one a line")
    p.add_argument("--overhead-delay-ms", type=float, default=0.0, help="--overhead: fixed cost per retriever call")
    p.add_argument("--direct", action="store_true", help="--run: also measure the retriever's batched throughput")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, help="append the result as Markdown to this file")
    p.add_argument("--title", default=None)
    p.add_argument("--api-key", default=os.environ.get("ACE_API_KEY"))
    p.add_argument("--serve-overhead-port", type=int, help=argparse.SUPPRESS)  # internal: the overhead server
    p.add_argument("overrides", nargs="*", help="ServeConfig overrides for the started server, key=value")
    if "--serve-overhead-port" in (argv if argv is not None else sys.argv[1:]):
        ns, rest = p.parse_known_args(argv)
        _serve_overhead(ns.serve_overhead_port, ns.overhead_delay_ms, rest)
        return 0
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 1000 and 1 <= args.searches <= 1_000_000):
        raise SystemExit("--clients must be 1..1000 and --searches 1..1,000,000")

    proc = None
    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        if args.url:
            url = args.url.rstrip("/")
            _require_loopback(url)
            _wait_healthy(url, None, 10)
        else:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            if args.run:
                cmd = [sys.executable, str(ROOT / "serve.py"), "--run", str(args.run), "--host", "127.0.0.1",
                       "--port", str(port), "--log-level", "warning", *args.overrides]
                if args.device:
                    cmd += ["--device", args.device]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--overhead", "--serve-overhead-port", str(port),
                       "--overhead-delay-ms", str(args.overhead_delay_ms), *args.overrides]
            proc = subprocess.Popen(cmd, cwd=ROOT)
            _wait_healthy(url, proc, 300)
        queries = load_queries(args)
        if args.compare:
            rows = compare_mixes(url, proc or args.server_pid, queries, args.compare, rounds=args.rounds, clients=args.clients,
                                 searches=args.searches, k=args.k, max_seconds=args.max_seconds, api_key=args.api_key)
            print(json.dumps(rows, indent=2))
            if args.out:
                command = "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else shlex.join(argv)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(compare_markdown(args.title or f"Traffic mixes on {args.run or args.url}", command, rows,
                                             args.rounds, args.clients))
            return 0 if not any(r["errors"] for r in rows) else 1
        cpu0, srv0 = time.process_time(), _proc_cpu_s(proc)
        res = asyncio.run(run_load(url, queries, clients=args.clients, searches=args.searches, k=args.k,
                                   max_seconds=args.max_seconds, api_key=args.api_key,
                                   mix=request_mix(args.mix, args.k)))
        res["client_cpu_s"] = round(time.process_time() - cpu0, 1)
        if proc is not None:
            res["server_cpu_s"] = round(_proc_cpu_s(proc) - srv0, 1)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    res["loadavg"] = round(loadavg, 2) if loadavg is not None else None
    if args.run and args.direct:
        from ace.config import ServeConfig, load_config
        serve_cfg = load_config(ServeConfig, None, args.overrides)
        if serve_cfg.torch_threads:
            import torch
            torch.set_num_threads(serve_cfg.torch_threads)
        res.update(direct_throughput(args.run, queries, batch=serve_cfg.max_batch, k=args.k,
                                     count=min(args.searches, 2000), device=args.device))
    print(json.dumps(res, indent=2))
    if args.out:
        title = args.title or ("Server overhead only (synthetic constant-cost retriever, no model)" if args.overhead
                               else f"Served run {args.run or args.url}")
        command = "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else shlex.join(argv)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(to_markdown(title, command, res))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
