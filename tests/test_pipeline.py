"""train.py end to end on a tiny corpus with inline embeddings: stages, skipping, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["car", "dog", "house", "boat", "tree", "chair"]
TEMPLATES = ["a {c} {t}", "the {t} is {c}", "photo of a {c} {t}", "{c} coloured {t}", "picture showing one {c} {t}",
             "a {t} painted {c}"]


def make_corpus(path: Path, dim: int = 24) -> Path:
    rng = np.random.default_rng(0)
    colour_vec, thing_vec = rng.standard_normal((6, dim)), rng.standard_normal((6, dim))
    rows = []
    for ci, c in enumerate(COLOURS):
        for ti, t in enumerate(THINGS):
            emb = colour_vec[ci] + thing_vec[ti] + 0.05 * rng.standard_normal(dim)
            rows.append({"item_id": f"{c}-{t}", "modality": "image", "embedding": emb.tolist(),
                         "captions": [tpl.format(c=c, t=t) for tpl in TEMPLATES]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, **training) -> Path:
    corpus = make_corpus(tmp_path / "corpus.jsonl")
    steps = training.get("max_steps", 150)
    cfg = f"""
name: tiny
run_dir: {tmp_path / 'run'}
corpus: {{path: {corpus}}}
split: {{test_captions: [-1]}}
encoder: {{image: {{kind: precomputed}}, dim: 0}}
identifiers: {{K: 4, codebook_size: 4, M: 2, max_u: 16, rqvae_max_steps: 60, kmeans_n_init: 1}}
querygen: {{backend: captions}}
model: {{d_model: 32, n_heads: 2, encoder_layers: 2, decoder_layers: 1, ffn_dim: 64, query_vocab_size: 60}}
training: {{batch_size: 30, max_steps: {steps}, warmup_steps: 10, lr: 3.0e-3, checkpoint_every: {training.get('checkpoint_every', 50)}, eval_every: 0, num_beams: 5, eval_top_k: 5, progress: false}}
eval: {{num_beams: [5], top_k: 5}}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg)
    return path


def run_train(cfg: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--quiet", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_pipeline_runs_every_stage_then_skips(tmp_path):
    cfg = config(tmp_path)
    first = run_train(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "report.md", "embeddings.npy", "identifiers/format.json",
                 "model/config.json", "plots/training_curves.png", "plots/identifiers.png", "plots/recall.png"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    head = metrics["by_group"]["all"]
    assert head["queries"] == 36
    # held-out template, 36 items: well above chance (1/36 ~ 2.8%)
    assert head["R@5"] > 30.0, metrics
    assert "| all |" in (run / "report.md").read_text()
    second = run_train(cfg)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("corpus", "encode", "identifiers", "querygen", "train", "eval"):
        assert f"[{stage}] up to date" in second.stdout
    # --force train retrains from scratch (not a resume at the final checkpoint), then the later stages
    log = run / "train_log.jsonl"
    log.unlink()
    forced = run_train(cfg, "--force", "train")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "[train] forced: discarding the checkpoints" in forced.stdout and "resuming" not in forced.stdout
    assert "[identifiers] up to date" in forced.stdout and "[eval] running" in forced.stdout
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    assert steps and steps[0] < 20 and steps[-1] == 150, steps[:3]
    # changing a training value re-runs training and what follows, not the stages before it
    third = run_train(cfg, "training.max_steps=20")
    assert "[identifiers] up to date" in third.stdout and "[train] running" in third.stdout


def test_pipeline_resumes_training_after_kill(tmp_path):
    cfg = config(tmp_path, max_steps=400, checkpoint_every=20)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--quiet"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            done = [d for d in ckpts.glob("step-*") if (d / "trainer_state.json").is_file()] if ckpts.is_dir() else []
            if done:
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = max(int(d.name.split("-")[1]) for d in ckpts.glob("step-*") if (d / "trainer_state.json").is_file())
    assert killed_at < 400
    again = run_train(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[train] resuming from checkpoint step-" in again.stdout
    state = json.loads(max(((int(d.name.split('-')[1]), d) for d in ckpts.glob("step-*")))[1].joinpath("trainer_state.json").read_text())
    assert state["step"] == 400
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice after the resume


def test_bad_corpus_rows_are_named(tmp_path):
    cfg = config(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    rows = corpus.read_text().splitlines()
    corpus.write_text("\n".join(rows + [rows[0]]) + "\n")  # a duplicate item id
    out = run_train(cfg)
    assert out.returncode == 2
    assert "duplicate" in out.stderr.lower() and "red-car" in out.stderr


def test_time_limited_querygen_is_not_done_while_items_are_pending(tmp_path):
    cfg = config(tmp_path)
    marker = tmp_path / "run" / "stages" / "querygen.json"
    limited = run_train(cfg, "--until", "querygen", "querygen.max_seconds=0", "querygen.batch_size=8")
    assert limited.returncode == 2, limited.stdout[-2000:]
    assert "28 of 36 items are still pending" in limited.stderr and "re-run" in limited.stderr
    assert not marker.exists() and not (tmp_path / "run" / "train_queries.json").exists()
    again = run_train(cfg, "--until", "querygen", "querygen.batch_size=8")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "8 from cache, 28 generated" in again.stdout and marker.exists()
