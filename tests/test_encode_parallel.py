"""The data-parallel encode stage (ace/pipeline/encode_stage.py, issue 15): N processes give the bytes of
one process, a killed run resumes from the shards already written, bad input is a clear error.

The corpus mixes text items (MiniLM, batches of 3: padding makes a text's float result depend on the
batch it is in) with image items (inline 16-d embeddings), interleaved in corpus order.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ace.config import config_hash, load_config, save_config
from ace.data.corpus import load_corpus
from ace.data.encoders import MultiModalEncoder
from ace.pipeline.encode_stage import EncodeStage, ShardFolder, encode_shards
from ace.pipeline.launch import Launch, LaunchError
from ace.pipeline.run_config import RunConfig
from ace.pipeline.stages import Pipeline, PipelineError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a red square drifts slowly over the dark blue water while two small birds sing near an old bridge".split()


def make_corpus(folder: Path, n: int = 21) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        text = " ".join(WORDS[: 2 + (7 * i) % (len(WORDS) - 2)])  # 2 to 19 words: uneven padding in a batch
        if i % 3 == 2:
            rows.append({"item_id": f"img{i}", "modality": "image", "embedding": rng.standard_normal(16).tolist(),
                         "captions": [f"picture {i}", f"image number {i}"]})
        else:
            rows.append({"item_id": f"txt{i}", "modality": "text", "metadata": {"text": text},
                         "captions": [text, f"query {i}"]})
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, name: str = "run", **encode) -> RunConfig:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.is_file():
        make_corpus(tmp_path)
    overrides = [f"run_dir={tmp_path / name}", f"corpus.path={corpus}", "split.test_captions=[-1]",
                 "encoder.text.kind=sentence-transformers", "encoder.text.name_or_path=minilm",
                 "encoder.text.batch_size=3", "encoder.image.kind=precomputed", "encoder.image.batch_size=2",
                 "encoder.dim=0"] + [f"encode.{k}={v}" for k, v in encode.items()]
    return load_config(RunConfig, None, overrides)


def encode(cfg: RunConfig) -> Path:
    Pipeline(cfg, progress=False).run_all(until="encode")
    return Path(cfg.run_dir)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, in memory: MultiModalEncoder.encode over the training corpus (no cache, no shards)."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = config(tmp)
    Pipeline(cfg, progress=False).run_all(until="corpus")
    corpus = load_corpus(Path(cfg.run_dir) / "corpus_train.jsonl", validate=False)
    return tmp, corpus, MultiModalEncoder(cfg.encoder).encode_corpus(corpus)


def test_two_processes_give_the_bytes_of_one(reference, tmp_path):
    tmp, corpus, ref = reference
    # the check can fail: other text batches (4 instead of 3) give other bytes
    other = config(tmp).encoder
    other.text.batch_size = 4
    assert not np.array_equal(MultiModalEncoder(other).encode_corpus(corpus), ref)

    one = encode(config(tmp_path, "one", processes=1))
    two = encode(config(tmp_path, "two", processes=2, shard_batches=2))
    assert np.load(one / "embeddings.npy").dtype == np.float32
    assert np.array_equal(np.load(one / "embeddings.npy"), ref)
    assert sha(one / "embeddings.npy") == sha(two / "embeddings.npy")
    assert (one / "item_ids.json").read_text() == (two / "item_ids.json").read_text()
    record = json.loads((two / "stages" / "encode.json").read_text())
    assert record["processes"] == 2 and record["shards"] == 5 and record["shards_reused"] == 0  # 9 batches / 2
    assert not (two / "encode_shards").exists()  # removed once the stage is done
    # the stage key does not depend on how it ran: a re-run with 1 process is up to date
    assert json.loads((one / "stages" / "encode.json").read_text())["key"] == record["key"]


def planned(cfg: RunConfig, corpus):
    """The corpus stage done and the encode shards planned, as the stage does before its workers start."""
    Pipeline(cfg, progress=False).run_all(until="corpus")
    run = Path(cfg.run_dir)
    stage = EncodeStage(run, cfg.encoder, cfg.encode, config_hash(Pipeline(cfg).corpus_key(), cfg.encoder))
    plan = stage.plan(corpus)
    folder = ShardFolder(run)
    folder.prepare(plan, cfg.encoder, 1)
    return run, plan, folder


def test_killed_run_resumes_from_the_written_shards(reference, tmp_path, monkeypatch):
    _, corpus, ref = reference
    cfg = config(tmp_path, processes=2, shard_batches=1)
    run, plan, folder = planned(cfg, corpus)
    # the state a kill leaves: worker 1 finished its shards; worker 0 died inside one write, or between
    # the rename of a shard's data and its manifest
    encode_shards(run, plan, plan.owned(1), MultiModalEncoder(cfg.encoder), corpus, rank=1)  # what worker 1 does
    done = plan.owned(1)
    assert done == [4, 5, 6, 7, 8] and all(folder.manifest(s).is_file() for s in done)
    assert not any(folder.manifest(s).is_file() for s in plan.owned(0))
    (folder.path / f".{folder.data(0).name}.tmp999").write_bytes(b"torn")
    folder.data(1).write_bytes(b"data without its manifest")
    stamps = {s: (folder.manifest(s).read_text(), folder.data(s).stat().st_mtime_ns) for s in done}

    seen = {}  # the shard files as the merge found them (the stage removes them afterwards)
    monkeypatch.setattr(ShardFolder, "remove", lambda self: seen.update(
        {s: (self.manifest(s).read_text(), self.data(s).stat().st_mtime_ns) for s in range(len(plan.shards))}))
    Pipeline(cfg, progress=False).run_all(until="encode")
    assert all(seen[s] == stamps[s] for s in done)  # not encoded again, not rewritten
    assert all(json.loads(seen[s][0])["rank"] == 0 for s in plan.owned(0))  # the re-run's worker 0 wrote the rest
    assert np.array_equal(np.load(run / "embeddings.npy"), ref)
    record = json.loads((run / "stages" / "encode.json").read_text())
    assert record["shards"] == 9 and record["shards_reused"] == 5


def test_more_processes_than_items_or_batches_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="22 processes for 21 items; use at most 21"):
        encode(config(tmp_path, "a", processes=22))
    with pytest.raises(PipelineError, match=r"make only 9 encoder batches .*text 3.*image 2.*at most 9 processes"):
        encode(config(tmp_path, "b", processes=10))
    with pytest.raises(ValueError, match="processes and shard_batches must be >= 1"):
        config(tmp_path, "c", processes=0)


def test_corrupt_shard_is_a_clear_error(reference, tmp_path):
    _, corpus, _ = reference
    cfg = config(tmp_path, processes=1, shard_batches=3)
    run, plan, folder = planned(cfg, corpus)
    encode_shards(run, plan, [0, 1], MultiModalEncoder(cfg.encoder), corpus)
    data = bytearray(folder.data(1).read_bytes())
    data[-40] ^= 0xFF
    folder.data(1).write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"corrupt shard file .*shard-00001\.npz: its sha256 .*delete"):
        encode(cfg)
    folder.manifest(1).write_text("{not json")
    with pytest.raises(PipelineError, match=r"corrupt shard manifest .*shard-00001\.json"):
        encode(cfg)
    folder.manifest(1).unlink()  # as the message says: the shard is encoded again, the run completes
    folder.data(1).unlink()
    encode(cfg)
    assert np.array_equal(np.load(run / "embeddings.npy"), reference[2])


def test_a_failing_worker_is_named_with_its_error(tmp_path):
    cfg = config(tmp_path, processes=2)
    cfg.encoder.text.kind, cfg.encoder.text.name_or_path = "precomputed", ""  # text items have no embedding
    with pytest.raises(PipelineError, match=r"encode worker [01] of 2 failed \(exit code 2; its log: .*worker-[01]\.log\)"
                                            r": error: .*items without an 'embedding'.*'txt"):
        encode(cfg)


def test_launch_environment():
    assert Launch({}).world == 1 and Launch({"WORLD_SIZE": "1", "RANK": "3"}).rank == 0
    got = Launch({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (got.world, got.rank, got.local_rank) == (4, 2, 0)
    with pytest.raises(LaunchError, match="non-integers: 'x'/'2'"):
        Launch({"WORLD_SIZE": "2", "RANK": "x"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_ranks_then_rank_zero_trains(reference, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 train.py` on CPU (gloo): both ranks encode, the
    embeddings are the one-process bytes, rank 0 alone goes on through training."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file():
        pytest.skip("the accelerate command is not installed next to this python")
    cfg = config(tmp_path)
    yaml = tmp_path / "cfg.yaml"
    save_config(cfg, yaml)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(ROOT / "train.py"), "--config", str(yaml), "--quiet", "--until", "train",
         "encode.shard_batches=2", "identifiers.K=4", "identifiers.codebook_size=4", "identifiers.M=1",
         "identifiers.rqvae_max_steps=20", "querygen.backend=captions", "model.d_model=16", "model.n_heads=2",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.ffn_dim=16", "model.query_vocab_size=40",
         "training.max_steps=4", "training.batch_size=8", "training.warmup_steps=1", "training.eval_every=0",
         "training.checkpoint_every=4", "training.progress=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    run = Path(cfg.run_dir)
    assert np.array_equal(np.load(run / "embeddings.npy"), reference[2])
    record = json.loads((run / "stages" / "encode.json").read_text())
    assert record["processes"] == 2 and record["shards"] == 5
    assert "rank 1 of 2: done" in out and "[train] done" in out
    assert (run / "model").is_dir()
