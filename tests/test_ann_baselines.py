"""ace.bench.ann_baselines: exact reference, tuning walk, IVF shapes, cached builds."""
import numpy as np
import pytest

from ace.bench.ann_baselines import (AnnError, build_hnsw, exact_top_k, ivf_shape, near_item_sample, own_item_rate,
                                     parse_hnsw_builds, tune_search, tuned_index)
from ace.bench.synthetic import mixture_embeddings


@pytest.fixture(scope="module")
def data():
    x = mixture_embeddings(3000, 32, seed=5, components=20)
    rows, q = near_item_sample(x, 60, seed=9)
    return x, rows, q, exact_top_k(x, q)


def test_exact_top_k_matches_brute_force_across_chunks(data, monkeypatch):
    import ace.bench.ann_baselines as ab
    x, _, q, ex = data
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(np.sort(ex, 1), np.sort(brute, 1))
    monkeypatch.setattr(ab, "CHUNK", 700)                                     # several chunks, same answer
    assert np.array_equal(np.sort(exact_top_k(x, q), 1), np.sort(brute, 1))


def test_near_item_sample_rows_are_the_queries_sources(data):
    x, rows, q, ex = data
    assert len(set(rows.tolist())) == len(rows) == 60
    assert own_item_rate(ex, rows) == 1.0                                      # exact search finds the source item
    assert own_item_rate(np.zeros_like(ex), rows) <= 1 / 60


def test_tune_search_stops_at_the_first_value_that_meets_the_target(data):
    x, _, q, ex = data
    index, _ = build_hnsw(x, m=4, ef_construction=8, seed=0, cache_dir=None, threads=1, search_threads=1)
    res = tune_search(index, "faiss_hnsw", (10, 40, 160, 640, 3000), q, ex, target=0.9)
    recalls = [t["recall"] for t in res["tried"]]
    assert res["met"] and res["recall"] >= 0.9 and res["value"] == res["tried"][-1]["value"]
    assert all(r < 0.9 for r in recalls[:-1])                                  # stopped at the first that met it
    assert index.hnsw.efSearch == res["value"]
    miss = tune_search(index, "faiss_hnsw", (10, 40, 3000), q, ex, target=1.01)   # never met: flagged, and the
    top = max(t["recall"] for t in miss["tried"])                              # smallest value near the best recall
    assert not miss["met"] and len(miss["tried"]) == 3 and miss["recall"] >= top - 0.01
    assert miss["value"] == min(t["value"] for t in miss["tried"] if t["recall"] >= top - 0.01)


def test_tuned_index_tries_builds_in_order_and_caches(data, tmp_path):
    x, _, q, ex = data
    kw = dict(hnsw_builds=[(4, 4), (16, 40)], nlist_factor=1.0, pq_bytes=8, seed=0, cache_dir=str(tmp_path),
              threads=1, search_threads=1)
    index, info = tuned_index("faiss_hnsw", x, q, ex, target=0.99, **kw)
    assert info["params"]["M"] in (4, 16) and len(info["tried"]) <= 2
    assert info["met"] == (info["tune_recall"] >= 0.99)
    assert sorted(p.name for p in tmp_path.glob("hnsw_*.faiss"))               # builds cached
    again, info2 = tuned_index("faiss_hnsw", x, q, ex, target=0.99, **kw)
    assert info2["params"] == info["params"] and info2["build_s"] == info["build_s"]   # read from the cache
    ivf, iinfo = tuned_index("faiss_ivfsq8", x, q, ex, target=0.9, **kw)
    assert iinfo["params"]["nlist"] == round(3000 ** 0.5) and iinfo["params"]["nprobe"] <= iinfo["params"]["nlist"]
    pq, pinfo = tuned_index("faiss_ivfpq", x, q, ex, target=0.9, **kw)
    assert pinfo["params"]["pq_m"] == 8 and pinfo["params"]["pq_nbits"] == 8
    with pytest.raises(AnnError, match="unknown ANN backend"):
        tuned_index("annoy", x, q, ex, target=0.9, **kw)
    with pytest.raises(AnnError, match="target"):
        tuned_index("faiss_hnsw", x, q, ex, target=0.0, **kw)


def test_ivf_shape_and_hnsw_build_parsing():
    assert ivf_shape(1_000_000, 384, nlist_factor=4, pq_bytes=48) == {"nlist": 4000, "pq_m": 48, "pq_nbits": 8}
    assert ivf_shape(1_000_000, 1024, nlist_factor=4, pq_bytes=48)["pq_m"] == 32     # largest divisor <= 48
    small = ivf_shape(200, 32, nlist_factor=4, pq_bytes=48)
    assert small["nlist"] == 50 and small["pq_nbits"] < 8                     # N / 4 lists, fewer bits
    with pytest.raises(AnnError, match="positive"):
        ivf_shape(100, 8, nlist_factor=0, pq_bytes=8)
    assert parse_hnsw_builds(["32:40", "48:100"]) == [(32, 40), (48, 100)]
    for bad in (["32"], ["a:b"], ["1:40"], []):
        with pytest.raises(AnnError):
            parse_hnsw_builds(bad)


def test_cached_builds_are_keyed_by_the_vectors_not_only_their_shape(tmp_path):
    a = mixture_embeddings(400, 16, seed=1, components=8)
    b = mixture_embeddings(400, 16, seed=2, components=8)                     # same shape, other items
    kw = dict(m=8, ef_construction=10, seed=0, cache_dir=str(tmp_path), threads=1, search_threads=1)
    ia, sa = build_hnsw(a, **kw)
    ib, _ = build_hnsw(b, **kw)
    assert len(list(tmp_path.glob("hnsw_*.faiss"))) == 2
    ib.hnsw.efSearch = 400
    assert np.array_equal(ib.search(b[:20], 1)[1][:, 0], np.arange(20))         # b's own index, not a's
    assert build_hnsw(a, **kw)[1] == sa                                        # a's build read back from the cache
