import numpy as np
import pytest

from ace.bench.baselines import (BaselineError, SplitEmbeddings, doc_plus_queries_vectors, dt_doc_plus_queries,
                           dt_trained, dt_zero_shot, encode_split, query_targets, search_topk)
from ace.data.importers import ProxySplit
from ace.metrics import retrieval_metrics
from ace.newitems.query_tower import QueryTowerConfig

try:  # tests/ may or may not be a package
    from tests.fakes_fallback import TableEncoder, unit
except ImportError:
    from fakes_fallback import TableEncoder, unit


def tiny_split():
    """3 items in 2-D; documents point along x, y and the diagonal, queries are hand-placed."""
    table = {
        "doc a": np.array([1.0, 0.0]), "doc b": np.array([0.0, 1.0]), "doc c": np.array([1.0, 1.0]),
        # generated queries: a's sit at +45 deg, pulling a's mean towards c; b's straight along y
        "qa1": np.array([1.0, 0.9]), "qa2": np.array([0.9, 1.0]), "qb1": np.array([0.0, 1.0]),
        "qb2": np.array([0.1, 1.0]), "qc1": np.array([1.0, 1.05]), "qc2": np.array([1.05, 1.0]),
        # test queries
        "ta": np.array([1.0, 0.5]), "tb": np.array([-0.2, 1.0]), "tc": np.array([1.0, 0.8]),
    }
    split = ProxySplit(item_ids=["a", "b", "c"], modalities=["image"] * 3, documents=["doc a", "doc b", "doc c"],
                       train_queries=[("a", "qa1"), ("a", "qa2"), ("b", "qb1"), ("b", "qb2"), ("c", "qc1"),
                                      ("c", "qc2")],
                       test_queries=[("a", "ta"), ("b", "tb"), ("c", "tc")])
    return split, TableEncoder(table)


def test_dt_zero_shot_hand_computed():
    split, enc = tiny_split()
    emb = encode_split(split, enc)
    # ta=(1,.5): cos to a .894, c .949 -> c first; tb -> b; tc=(1,.8): c .994 first
    rankings = dt_zero_shot(split, emb, k=3)
    assert rankings == [["c", "a", "b"], ["b", "c", "a"], ["c", "a", "b"]]
    assert query_targets(split) == ["a", "b", "c"]
    m = retrieval_metrics(rankings, query_targets(split))
    assert m["R@1"] == pytest.approx(100 * 2 / 3) and m["R@5"] == 100.0


def test_dt_doc_plus_queries_is_the_mean_of_document_and_queries():
    split, enc = tiny_split()
    emb = encode_split(split, enc)
    vecs = doc_plus_queries_vectors(split, emb)
    expected_a = unit((unit(enc.encode(["doc a"])) + enc.encode(["qa1"]) + enc.encode(["qa2"])) / 3)
    np.testing.assert_allclose(vecs[0], expected_a[0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    assert dt_doc_plus_queries(split, emb, k=1) == [[r] for r in np.array(["a", "b", "c"])[
        np.argmax(emb.test_queries @ vecs.T, axis=1)].tolist()]


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_hnsw"])
def test_backends_agree_with_exact_torch_search(backend):
    rng = np.random.default_rng(0)
    items, queries = unit(rng.standard_normal((300, 16))), unit(rng.standard_normal((40, 16)))
    exact = search_topk(items, queries, 5, backend="torch")
    got = search_topk(items, queries, 5, backend=backend)
    assert got.shape == (40, 5)
    if backend == "faiss_flat":
        np.testing.assert_array_equal(got, exact)
    else:  # approximate, but on 300 points with efSearch 128 nearly exact
        assert np.mean(got[:, 0] == exact[:, 0]) > 0.9
    padded = search_topk(items[:3], queries, 5, backend="torch")
    assert (padded[:, 3:] == -1).all()


def test_dt_trained_beats_zero_shot_when_query_space_is_rotated():
    """Queries live in a rotated text space: zero-shot fails, a trained projection recovers it."""
    rng = np.random.default_rng(0)
    n, d = 40, 8
    docs = unit(rng.standard_normal((n, d)))
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    table = {f"doc{i}": docs[i] for i in range(n)}
    train, test = [], []
    for i in range(n):
        for j in range(4):
            table[f"q{i}_{j}"] = rot @ docs[i] + 0.1 * rng.standard_normal(d)
            (train if j < 3 else test).append((f"i{i}", f"q{i}_{j}"))
    split = ProxySplit([f"i{i}" for i in range(n)], ["image"] * n, [f"doc{i}" for i in range(n)], train, test)
    enc = TableEncoder(table)
    emb = encode_split(split, enc)
    targets = query_targets(split)
    zero = retrieval_metrics(dt_zero_shot(split, emb), targets)
    cfg = QueryTowerConfig(epochs=60, batch_size=32, lr=1e-2, init_identity=False, device="cpu")
    rankings, tower = dt_trained(split, emb, enc, config=cfg)
    trained = retrieval_metrics(rankings, targets)
    assert trained["R@1"] > zero["R@1"] + 40, (zero, trained)
    same, _ = dt_trained(split, emb, enc, tower=tower, backend="faiss_flat")
    assert same == rankings


def test_encode_split_cache(tmp_path):
    split, enc = tiny_split()
    first = encode_split(split, enc, cache_dir=tmp_path, encoder_name="table")
    enc.table.clear()  # a cache hit must not call the encoder again
    again = encode_split(split, enc, cache_dir=tmp_path, encoder_name="table")
    np.testing.assert_array_equal(first.test_queries, again.test_queries)


def test_baselines_bad_inputs():
    split, enc = tiny_split()
    emb = encode_split(split, enc)
    with pytest.raises(BaselineError, match="unknown search backend"):
        dt_zero_shot(split, emb, backend="annoy")
    with pytest.raises(BaselineError, match="do not match"):
        search_topk(np.ones((3, 4), np.float32), np.ones((2, 5), np.float32), 1)
    with pytest.raises(BaselineError, match="k must be"):
        search_topk(np.ones((3, 4), np.float32), np.ones((2, 4), np.float32), 0)
    short = SplitEmbeddings(emb.documents[:2], emb.train_queries, emb.test_queries)
    with pytest.raises(BaselineError, match="documents embeddings have shape"):
        dt_zero_shot(split, short)
    nan = SplitEmbeddings(emb.documents.copy(), emb.train_queries, emb.test_queries)
    nan.documents[0, 0] = np.nan
    with pytest.raises(BaselineError, match="NaN"):
        dt_doc_plus_queries(split, nan)


def test_bench_baselines_cli_on_a_tiny_caption_file(tmp_path):
    """The benchmark script end to end (real offline MiniLM) on a 24-item Karpathy-format file."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_baselines.py"
    spec = importlib.util.spec_from_file_location("bench_baselines", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    animals = ["dog", "cat", "horse", "bird", "cow", "goat", "duck", "fox"]
    places = ["beach", "kitchen", "forest"]
    data = [{"split": "val", "image_name": f"{a}_{p}.jpg",
             "captions": [f"a {a} in the {p}", f"the {a} stands in a {p}", f"photo of a {a} at the {p}",
                          f"a {a} seen in the {p}", f"{p} with a {a}"]} for a in animals for p in places]
    path = tmp_path / "tiny_val.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    res = bench.main([str(path), "--backends", "torch,faiss_flat", "--bits", "32", "--candidates", "8",
                      "--index", "flat", "--new-frac", "0.25", "--tower", "epochs=3", "--hash", "steps=20",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["items"] == 24 and saved["test_queries"] == 48
    rows = saved["rows"]
    assert rows["DT zero-shot [torch]"]["R@10"] == rows["DT zero-shot [faiss_flat]"]["R@10"] > 50
    assert rows["DT doc+queries [torch]"]["queries"] == 48
    assert saved["new_items"]["n"] == 6
    assert "| DT trained [torch] |" in res["table"]
