import os
from pathlib import Path

import pytest

# Tests never reach a model hub: a missing local file must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: one intra-op thread is faster than two (no OpenMP hand-off per op), and
# far faster when other processes share the cores. Subprocesses (train.py, servers) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread settings above)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data from the project root; tests that need it skip cleanly when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# ---- a tiny trained run with a fallback stage, shared by the items, hardening and crash tests -------------
ITEMS_DIM = 24


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """The tiny pipeline run of tests/test_pipeline.py (36 items, 24-d inline embeddings) + the fallback stage."""
    return build_items_run(tmp_path_factory.mktemp("items_run"))


def build_items_run(tmp: Path) -> Path:
    """Train the tiny run with a fallback stage in ``tmp`` (also benchmarks/bench_replicas.py's run); returns RUN."""
    from ace.config import load_config
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline
    from tests.test_pipeline import make_corpus

    corpus = make_corpus(tmp / "corpus.jsonl", dim=ITEMS_DIM)
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(f"""
name: tiny-items
run_dir: {tmp / 'run'}
corpus: {{path: {corpus}}}
split: {{test_captions: [-1]}}
encoder: {{image: {{kind: precomputed}}, dim: {ITEMS_DIM}}}
identifiers: {{K: 4, codebook_size: 4, M: 2, max_u: 1024, rqvae_max_steps: 60, kmeans_n_init: 1}}
querygen: {{backend: captions}}
model: {{d_model: 32, n_heads: 2, encoder_layers: 2, decoder_layers: 1, ffn_dim: 64, query_vocab_size: 60}}
training: {{batch_size: 30, max_steps: 150, warmup_steps: 10, lr: 3.0e-3, checkpoint_every: 150, eval_every: 0, num_beams: 5, eval_top_k: 5, progress: false}}
eval: {{num_beams: [5], top_k: 5}}
fallback: {{calibration_queries: 36, tower: {{epochs: 20, batch_size: 32, device: cpu}}, hash: {{bits: 64, steps: 100, device: cpu}}, index: {{kind: flat}}}}
""")
    Pipeline(load_config(RunConfig, cfg_path), progress=False).run_all()
    return tmp / "run"


@pytest.fixture(scope="session")
def text_encoder():
    from ace.data.encoders import TextEncoder

    return TextEncoder()


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A private copy of the trained run, with its own (empty) corpus root for media and uploads."""
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(base_run, out, ignore=shutil.ignore_patterns("checkpoints", "cache", "plots"))
    (tmp_path / "media").mkdir()
    (out / "corpus_root.json").write_text(json.dumps({"root": str(tmp_path / "media")}))
    return out


# ---- PostgreSQL for the shared item store (tests/pg_support.py) ---------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """The admin URL of a PostgreSQL server: $ACE_TEST_PG_URL, else a throwaway cluster for this session."""
    from tests.pg_support import Cluster

    if os.environ.get("ACE_TEST_PG_URL"):
        yield os.environ["ACE_TEST_PG_URL"]
        return
    cluster = Cluster()
    try:
        yield cluster.url()
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a fresh, empty database for one test."""
    from tests.pg_support import new_database

    return new_database(pg_server)
