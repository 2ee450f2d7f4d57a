"""Encode stage on the demo corpus: 1 process vs 2 (workers of the stage, and the ranks of an accelerate
launch), the bytes of embeddings.npy, and a real kill -9 mid-encode then resume.

    python benchmarks/bench_encode_parallel.py [--out benchmarks/out/encode_parallel] [--config configs/demo.yaml]

Every run is a fresh run folder (no embedding cache), `train.py --until encode`, wall time of the whole
command (Python start, corpus stage, model loads, encode, merge) and the encode stage's own seconds
from RUN/stages/encode.json. Prints a markdown table; the load average is read before and after each run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(args, run: Path, *extra: str, threads: int = 1, launch: list[str] | None = None, wait=True):
    cmd = (launch or [sys.executable]) + [str(ROOT / "train.py"), "--config", args.config, "--until", "encode",
                                          "--quiet", f"run_dir={run}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True), cmd
    t, cpu = time.time(), _children_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.time() - t, _children_cpu() - cpu, cmd


def _children_cpu() -> float:
    """User + system CPU seconds of every finished (waited-for) descendant: the command and its workers."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def record(run: Path) -> dict:
    return json.loads((run / "stages" / "encode.json").read_text())


def sha(run: Path) -> str:
    return hashlib.sha256((run / "embeddings.npy").read_bytes()).hexdigest()[:16]


def show(cmd: list[str]) -> str:
    return " ".join(Path(c).name if c.endswith(("python", "accelerate")) or c.endswith("train.py") else c for c in cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="benchmarks/out/encode_parallel")
    args = ap.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    runs = [  # (label, run name, extra overrides, threads, launcher)
        ("1 process, 1 thread", "p1t1", ["encode.processes=1"], 1, None),
        ("2 worker processes (encode.processes=2), 1 thread each", "p2t1", ["encode.processes=2"], 1, None),
        ("accelerate launch --multi_gpu --num_processes 2 (gloo on CPU), 1 thread each", "acc2", [], 1,
         [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--main_process_port", "29533"]),
        ("1 process, 2 threads", "p1t2", ["encode.processes=1"], 2, None),
    ]
    rows = []
    for label, name, extra, threads, launch in runs:
        load0 = os.getloadavg()[0]
        wall, cpu, cmd = train(args, out / name, *extra, threads=threads, launch=launch)
        rec = record(out / name)
        rows.append((label, wall, cpu, rec["seconds"], rec["shards"], sha(out / name), load0, os.getloadavg()[0], cmd))
        print(rows[-1][:-1], flush=True)

    # kill -9 mid-encode (the stage and its workers), then the same command again
    run = out / "killed"
    extra = ["encode.processes=2", "encode.shard_batches=1"]
    proc, kill_cmd = train(args, run, *extra, wait=False)
    shards = run / "encode_shards"
    while proc.poll() is None and len(list(shards.glob("shard-*.json"))) < 4:
        time.sleep(0.2)
    written = len(list(shards.glob("shard-*.json")))
    if proc.poll() is not None:
        raise SystemExit("the encode finished before the kill: raise the corpus size or lower encode.shard_batches")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    plan = json.loads((shards / "plan.json").read_text())
    wall, _, _ = train(args, run, *extra)
    rec = record(run)

    print("\n| how | wall s (whole command) | CPU s (all its processes) | encode stage s | shards | "
          "sha256(embeddings.npy)[:16] | load avg before / after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, wall_s, cpu_s, stage_s, n, digest, l0, l1, _ in rows:
        print(f"| {label} | {wall_s:.1f} | {cpu_s:.1f} | {stage_s:.1f} | {n} | `{digest}` | {l0:.1f} / {l1:.1f} |")
    print(f"\nkill -9 after {written} of {len(plan['shards'])} shards were written; the re-run reused "
          f"{rec['shards_reused']} shards, encode stage {rec['seconds']:.1f} s, sha256 `{sha(run)}`")
    print("\ncommands:")
    for *_, cmd in rows:
        print(f"    OMP_NUM_THREADS=... {show(cmd)}")
    print(f"    kill: {show(kill_cmd)}  (killpg SIGKILL after 4 shard manifests), then the same command again")


if __name__ == "__main__":
    main()
