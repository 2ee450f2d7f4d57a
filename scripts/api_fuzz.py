"""Fuzz the HTTP API with schemathesis against a small trained run: 0 server errors, 0 spec-conformance failures.

    python scripts/api_fuzz.py [--work runs/api_fuzz] [--max-time 150]

Trains a tiny run (48 synthetic items with inline embeddings + the fallback stage, ~1-2 min on one
CPU thread; reused when already there), starts ``serve.py`` on a free loopback port with a write key,
then runs ``schemathesis run`` on its /openapi.json with every check (``--checks all``) and every
phase (examples, coverage, fuzzing, stateful), bounded by ``--max-time`` seconds, with the settings of
scripts/schemathesis.toml (which says why POST /items may answer 422 to schema-valid data). Exits
non-zero when schemathesis finds any failure; its report is printed (and kept in WORK/schemathesis.log).
CI (.ci/run) runs it; schemathesis is pinned there and in the test extras.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load_test import _free_port as free_port, _wait_healthy  # noqa: E402  (loopback port; polls /health)

KEY = "fuzz-key"
CONFIG = """
name: api-fuzz
run_dir: {run}
corpus: {{path: {corpus}}}
split: {{test_captions: [-1]}}
encoder: {{image: {{kind: precomputed}}, dim: {dim}}}
identifiers: {{K: 4, codebook_size: 4, M: 2, max_u: 1024, rqvae_max_steps: 60, kmeans_n_init: 1}}
querygen: {{backend: captions}}
model: {{d_model: 32, n_heads: 2, encoder_layers: 2, decoder_layers: 1, ffn_dim: 64, query_vocab_size: 80}}
training: {{batch_size: 32, max_steps: 120, warmup_steps: 10, lr: 3.0e-3, checkpoint_every: 120, eval_every: 0, num_beams: 5, eval_top_k: 5, progress: false}}
eval: {{num_beams: [5], top_k: 5}}
fallback: {{calibration_queries: 48, tower: {{epochs: 10, batch_size: 32, device: cpu}}, hash: {{bits: 64, steps: 60, device: cpu}}, index: {{kind: flat}}}}
"""


def build_run(work: Path, dim: int = 24) -> Path:
    from ace.bench.synthetic import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, make_synthetic_task

    run = work / "run"
    if (run / "stages" / "report.json").is_file():
        return run
    task = make_synthetic_task(48, dim=dim, seed=0)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for item_id, (c, o, p), emb in zip(task.item_ids, task.attributes, task.embeddings):
        caps = [t.format(colour=c, object=o, place=p) for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES[:1]]
        rows.append({"item_id": item_id, "modality": "image", "embedding": emb.tolist(), "captions": caps})
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "media").mkdir(exist_ok=True)
    cfg = work / "fuzz.yaml"
    cfg.write_text(CONFIG.format(run=run, corpus=corpus, dim=dim))
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--quiet"], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "api_fuzz")
    ap.add_argument("--max-time", type=int, default=150, help="schemathesis time budget in seconds")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = build_run(args.work)
    served = args.work / "served"  # a copy: adds and deletes of the fuzzer never touch the trained run
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(run, served, ignore=shutil.ignore_patterns("checkpoints", "cache", "store.*"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = args.work / "server.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACE_API_KEY": KEY}
    with open(log_path, "w") as server_log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(served), "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning", "max_wait_ms=1", "torch_threads=1"],
                                cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_healthy(url, proc, 300)
            except SystemExit:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise
            st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
            if st is None:
                raise SystemExit("schemathesis is not installed: pip install 'schemathesis==4.32.5'")
            cmd = [st, "--config-file", str(ROOT / "scripts" / "schemathesis.toml"), "run", f"{url}/openapi.json", "--checks", "all",
                   "--phases", "examples,coverage,fuzzing,stateful", "--max-time", str(args.max_time),
                   "--workers", "1", "--request-timeout", "60", "--header", f"X-API-Key: {KEY}", "--seed", "1",
                   "--suppress-health-check", "too_slow,filter_too_much"]
            print("$", " ".join(cmd), flush=True)
            with open(args.work / "schemathesis.log", "w") as out:
                res = subprocess.run(cmd, cwd=args.work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})
                out.write(res.stdout)
            print(res.stdout[-12000:])
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    errors = [line for line in log_path.read_text().splitlines() if "Traceback" in line or " ERROR " in line]
    if errors:
        print(f"server log has {len(errors)} error lines (see {log_path})", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
