"""ace.bench efficiency: the CLI on tiny corpora (JSON / Markdown / PNG outputs) and its accounting helpers."""
import json

import numpy as np
import pytest
import torch

from ace.bench.__main__ import main as bench_main
from ace.bench.ann_baselines import AnnError
from ace.bench.efficiency import (EfficiencyConfig, EfficiencyError, bytes_per_item, faiss_index_bytes,
                                  latency_summary, near_item_queries, parse_ace_spec, ann_recall,
                                  state_dict_bytes, trie_bytes)
from ace.bench.synthetic import mixture_embeddings, random_codes
from identifiers.trie import FlatTrie

TINY_MODEL = "model:\n  d_model: 32\n  n_heads: 2\n  encoder_layers: 1\n  decoder_layers: 1\n  ffn_dim: 64\n"
TINY_IDS = ["--identifiers", "random", "--id", "K=16", "codebook_size=16", "max_u=8"]
FAST = ["--batch", "8", "--num-batches", "1", "--repeats", "2", "--latency-queries", "2", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run: N = 200 and 1000, D = 32, a tiny ACE shape (fp32 + int8) and all DT backends."""
    root = tmp_path_factory.mktemp("eff")
    (root / "tiny.yaml").write_text(TINY_MODEL)
    (root / "queries.txt").write_text("\n".join(f"a {c} dog on the {p}" for c in ("red", "blue", "green")
                                                for p in ("beach", "street", "grass", "snow")))
    tiny = {"d_model": 32, "n_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ffn_dim": 64}
    (root / "quality.json").write_text(json.dumps({"summary": [                   # ace.bench quality's format
        {"method": "dt_zero_shot", "beams": None, "R@1": 50.0, "R@10": 80.0},
        {"method": "ace_no_fusion", "beams": 5, "R@1": 30.0, "R@10": 60.0, "seeds": [0]},
        {"method": "ace", "beams": 25, "R@1": 45.0, "R@10": 75.0, "seeds": [0]},
        {"method": "ace", "beams": 5, "R@1": 40.0, "R@10": 70.0, "seeds": [0]},
        {"method": "dt_doc_plus_queries", "beams": None, "R@1": 60.0, "R@10": 90.0}],
        "configs": {"ace/seed0": {"model": {**tiny, "dropout": 0.1}},
                    "ace_no_fusion/seed0": {"model": {**tiny, "fusion": False}}}}))
    out = root / "out"
    rc = bench_main(["efficiency", "--out", str(out), "--sizes", "200", "1000", "--dims", "32",
                     "--ace", f"tiny={root / 'tiny.yaml'},dropout=0.0", "--queries", str(root / "queries.txt"),
                     "--trained", f"tiny-fp32={root / 'quality.json'}#ace beam 5",
                     "--trained", f"DT-torch={root / 'quality.json'}#dt_doc_plus_queries", *TINY_IDS, *FAST])
    assert rc == 0
    return out, json.loads((out / "efficiency.json").read_text())


def test_cli_json_rows_cover_every_method_and_size(tiny_run):
    _, res = tiny_run
    methods = {"tiny-fp32", "tiny-int8", "DT-torch", "DT-faiss_flat", "DT-faiss_hnsw", "DT-faiss_ivfpq",
               "DT-faiss_ivfsq8"}
    for n in (200, 1000):
        rows = {r["method"]: r for r in res["rows"] if r["n"] == n}
        assert set(rows) == methods
        for r in rows.values():
            assert r["device"] == "cpu" and r["dim"] == 32
            assert r["qps_median"] > 0 and r["qps_best"] >= r["qps_median"] and len(r["qps_runs"]) == 2
            assert 0 < r["p50_ms"] <= r["p99_ms"] and r["count"] == 4
            assert r["total_per_item"] > r["data_per_item"] > 0
        assert rows["DT-torch"]["data_bytes"] == n * 32 * 4                   # float32 N x D
        assert n * 32 * 4 <= rows["DT-faiss_flat"]["data_bytes"] < n * 32 * 4 + 1024
        assert rows["DT-faiss_hnsw"]["data_bytes"] > rows["DT-faiss_flat"]["data_bytes"]   # + graph links
        assert 0.0 <= rows["DT-faiss_hnsw"]["recall_at_10_vs_exact"] <= 1.0
        assert 0.5 <= rows["DT-faiss_hnsw"]["recall_at_10_near_items"] <= 1.0     # tiny graphs: near exact
        assert rows["DT-torch"]["recall_at_10_vs_exact"] is None and rows["DT-torch"]["ann"] is None
        for b in ("faiss_hnsw", "faiss_ivfpq", "faiss_ivfsq8"):                # tuned, settings recorded
            a = rows[f"DT-{b}"]["ann"]
            assert a["target"] == 0.95 and a["met"] == (a["tune_recall"] >= 0.95) and a["tried"]
            assert 0.0 <= rows[f"DT-{b}"]["recall_at_10_near_items"] <= 1.0
            assert rows[f"DT-{b}"]["own_item_top10"]["exact"] == 1.0               # near-item queries find their item
        assert set(rows["DT-faiss_hnsw"]["ann"]["params"]) == {"M", "efConstruction", "efSearch"}
        assert rows["DT-faiss_ivfsq8"]["ann"]["params"]["nprobe"] <= rows["DT-faiss_ivfsq8"]["ann"]["params"]["nlist"]
        pq = rows["DT-faiss_ivfpq"]["ann"]["params"]
        assert rows["DT-faiss_ivfpq"]["data_bytes"] >= n * (pq["pq_m"] * pq["pq_nbits"] // 8 + 8)   # codes + ids
        assert rows["DT-faiss_ivfsq8"]["data_bytes"] >= n * (32 + 8)             # + centroids and tables
        assert rows["tiny-fp32"]["data_bytes"] == rows["tiny-int8"]["data_bytes"]        # same trie + codes
        assert rows["tiny-int8"]["fixed_bytes"] < rows["tiny-fp32"]["fixed_bytes"]
    assert res["level_sizes"] == [16, 16, 16, 8]
    assert res["ace_shapes"]["tiny-fp32"]["d_model"] == 32
    assert res["machine"]["threads"] == 1 and len(res["machine"]["load_before"]) == 3


def test_cli_ratios_and_targets_are_consistent_with_rows(tiny_run):
    _, res = tiny_run
    assert len(res["ratios"]) == 2 * 2 * 5                                      # sizes x ACE x DT
    q = {(r["n"], r["method"]): r["qps_median"] for r in res["rows"]}
    for r in res["ratios"]:
        assert r["qps_ratio"] == pytest.approx(q[r["n"], r["ace"]] / q[r["n"], r["dt"]])
    t = {(x["ace"], x["target"]): x for x in res["targets"]}
    assert set(t) == {(a, k) for a in ("tiny-fp32", "tiny-int8") for k in ("ACE >= 3x DT exact", "ACE >= DT+HNSW")}
    for (ace, kind), x in t.items():
        assert x["n"] == 1000
        exact = min(q[1000, ace] / q[1000, "DT-torch"], q[1000, ace] / q[1000, "DT-faiss_flat"])
        want = exact if kind == "ACE >= 3x DT exact" else q[1000, ace] / q[1000, "DT-faiss_hnsw"]
        assert x["ratio"] == pytest.approx(want)
        assert x["met"] == (want >= (3.0 if "3x" in kind else 1.0))


def test_cli_markdown_and_png_outputs(tiny_run):
    out, res = tiny_run
    md = (out / "efficiency.md").read_text()
    assert md.startswith("# End-to-end efficiency")
    assert "python -m ace.bench efficiency" in md and "load average before" in md
    assert md.count("| cpu | 1,000 | 32 |") >= 7 + 10 + 3                    # table + ratio + ANN rows
    assert "efConstruction" in md and "nprobe" in md
    assert "Targets at the largest N" in md and "recall_vs_throughput.png" in md
    for name in ("throughput_vs_corpus_size.png", "recall_vs_throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    # the plot's rule: only tiny-fp32 has a trained figure of its shape; DT at D=32 is a random projection
    assert res["trained_recall"]["tiny-fp32"]["R@10"] == 70.0
    note = next(n for n in res["plot_notes"] if n.startswith("recall_vs_throughput.png"))
    assert "tiny-fp32 = " in note and "#ace beam 5" in note
    only = note.split("throughput only")[1]
    for m in ("tiny-int8", "DT-torch", "DT-faiss_flat", "DT-faiss_hnsw", "DT-faiss_ivfpq"):
        assert m in only


def test_cli_ace_only_without_quality_draws_speed_only(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_MODEL)
    rc = bench_main(["efficiency", "--out", str(tmp_path / "o"), "--sizes", "300", "--dims", "16", "--dt",
                     "--ace", f"t={tmp_path / 'tiny.yaml'}", "--precisions", "fp32", *TINY_IDS, *FAST])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "efficiency.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["t-fp32"] and res["ratios"] == [] and res["targets"] == []
    assert (tmp_path / "o" / "throughput_vs_corpus_size.png").is_file()
    assert not (tmp_path / "o" / "recall_vs_throughput.png").exists()
    assert "was not drawn: no measured method has a trained recall" in (tmp_path / "o" / "efficiency.md").read_text()


def test_cli_bad_model_key_is_a_clear_error(tmp_path, capsys):
    rc = bench_main(["efficiency", "--out", str(tmp_path), "--sizes", "50", "--dims", "8", "--dt",
                     "--ace", "bad=no_such_key=1", *TINY_IDS, *FAST])
    assert rc == 2
    assert "no_such_key" in capsys.readouterr().err


# ------------------------------------------------------------------------------ helpers

def test_latency_summary_percentiles():
    s = latency_summary(range(1, 101))                                          # 1..100 ms
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5) and s["count"] == 100
    assert latency_summary([7.0])["p99_ms"] == 7.0
    with pytest.raises(EfficiencyError, match="no latencies"):
        latency_summary([])
    with pytest.raises(EfficiencyError, match="finite"):
        latency_summary([1.0, float("nan")])


def test_bytes_per_item_known_case():
    b = bytes_per_item(fixed_bytes=1000, data_bytes=500, n=10)
    assert b == {"fixed_bytes": 1000, "data_bytes": 500, "data_per_item": 50.0, "total_per_item": 150.0}
    with pytest.raises(EfficiencyError, match="corpus size"):
        bytes_per_item(fixed_bytes=1, data_bytes=1, n=0)


def test_trie_bytes_counts_the_decoder_arrays():
    trie = FlatTrie.from_codes(np.array([[0, 0], [0, 1], [1, 0]]), [2, 2])      # root, 2 inner, 3 leaves
    assert trie_bytes(trie) == (6 + 6 + 5 + 5 + 6) * 8                        # start, count, code, node, leaf


def test_faiss_index_bytes_matches_serialisation():
    import faiss
    x = mixture_embeddings(500, 24, seed=1, components=10)
    flat = faiss.IndexFlatIP(24)
    hnsw = faiss.IndexHNSWFlat(24, 8, faiss.METRIC_INNER_PRODUCT)
    for index in (flat, hnsw):
        index.add(x)
        serial = len(faiss.serialize_index(index))
        assert x.nbytes <= faiss_index_bytes(index) <= serial < faiss_index_bytes(index) + 512
    assert faiss_index_bytes(flat) == x.nbytes
    with pytest.raises(AnnError, match="no size accounting"):
        faiss_index_bytes(faiss.IndexIVFFlat(flat, 24, 4))                         # untrained
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(24), 24, 4, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    assert faiss_index_bytes(ivf) == len(faiss.serialize_index(ivf)) >= 500 * (24 + 8)   # codes + ids


def test_state_dict_bytes_int8_smaller():
    from ace.model.decoding import quantize_dynamic_int8
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 4))
    fp32 = state_dict_bytes(m)
    assert fp32 >= (256 * 256 + 256 + 256 * 4 + 4) * 4
    assert state_dict_bytes(quantize_dynamic_int8(m)) < fp32 / 2


def test_near_item_queries_are_unit_and_close_to_their_items():
    x = mixture_embeddings(300, 16, seed=2, components=4)
    q = near_item_queries(x, 50, noise=0.1, seed=0)
    assert q.shape == (50, 16) and q.dtype == np.float32 and np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert (q @ x.T).max(axis=1).min() > 0.9                                   # each is near some item


def test_ann_recall():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    approx = np.array([[4, 3, 9, 8], [6, 5, 7, 1]])
    assert ann_recall(approx, exact) == pytest.approx((2 / 4 + 2 / 2) / 2)
    with pytest.raises(AnnError, match="shapes"):
        ann_recall(approx[:1], exact)


def test_parse_ace_spec():
    assert parse_ace_spec("default") == ("default", None, [])
    assert parse_ace_spec("m=configs/x.yaml,decoder_layers=4") == ("m", "configs/x.yaml", ["decoder_layers=4"])
    assert parse_ace_spec("t=d_model=32,n_heads=2") == ("t", None, ["d_model=32", "n_heads=2"])
    with pytest.raises(EfficiencyError, match="no name"):
        parse_ace_spec("=a.yaml")
    with pytest.raises(EfficiencyError, match="two config files"):
        parse_ace_spec("x=a.yaml,b.yaml")


def test_config_validation():
    with pytest.raises(EfficiencyError, match="precisions"):
        EfficiencyConfig(precisions=["fp16"])
    with pytest.raises(EfficiencyError, match="unknown DT backend"):
        EfficiencyConfig(dt_backends=["annoy"])
    with pytest.raises(EfficiencyError, match="cache_dir"):
        EfficiencyConfig(prepare_only=True)
    with pytest.raises(EfficiencyError, match="sizes"):
        EfficiencyConfig(sizes=[0])
    with pytest.raises(EfficiencyError, match="ann_target"):
        EfficiencyConfig(ann_target=1.5)
    with pytest.raises(EfficiencyError, match="M:efConstruction"):
        EfficiencyConfig(hnsw_builds=["32"])
    assert EfficiencyConfig(sizes=[1000, 10, 1000]).sizes == [10, 1000]


def test_random_codes_and_mixture_embeddings():
    codes = random_codes(500, [8, 8, 8], np.random.default_rng(0))
    assert codes.shape == (500, 3) and len({tuple(c) for c in codes}) == 500
    assert codes.min() >= 0 and codes.max() < 8
    with pytest.raises(ValueError, match="distinct"):
        random_codes(100, [3, 3], np.random.default_rng(0))
    x = mixture_embeddings(100, 16, seed=3, components=5)
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(x, mixture_embeddings(100, 16, seed=3, components=5))          # seeded
    assert not np.array_equal(x, mixture_embeddings(100, 16, seed=4, components=5))


def test_cli_from_json_redraws_without_measuring(tiny_run, tmp_path):
    out, res = tiny_run
    rc = bench_main(["efficiency", "--out", str(tmp_path / "re"), "--from-json", str(out / "efficiency.json")])
    assert rc == 0
    again = json.loads((tmp_path / "re" / "efficiency.json").read_text())
    assert again["rows"] == res["rows"] and again["config"]["trained"] == [] and again["trained_recall"] == {}
    assert (tmp_path / "re" / "throughput_vs_corpus_size.png").is_file()
    assert not (tmp_path / "re" / "recall_vs_throughput.png").exists()
    assert bench_main(["efficiency", "--out", str(tmp_path), "--from-json", str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--ann-target", "0"], "ann_target"),
    (["--hnsw-builds", "32:x"], "M:efConstruction"),
    (["--ivf-nlist-factor", "-1"], "ivf_nlist_factor"),
    (["--hybrid-beams", "-1"], "hybrid_beams"),
    (["--trained", "tiny-fp32"], "METHOD=RUN_DIR"),
    (["--trained", "tiny-fp32=/no/such/quality.json#ace beam 5"], "not found"),
])
def test_cli_new_flags_reject_bad_values(tmp_path, capsys, flags, message):
    rc = bench_main(["efficiency", "--out", str(tmp_path), "--sizes", "50", "--dims", "8", "--no-ace",
                     *flags, *TINY_IDS, *FAST])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_ann_flags_reach_the_tuning(tmp_path):
    rc = bench_main(["efficiency", "--out", str(tmp_path / "o"), "--sizes", "600", "--dims", "16", "--no-ace",
                     "--dt", "faiss_flat", "faiss_hnsw", "faiss_ivfpq", "--ann-target", "0.5",
                     "--hnsw-builds", "8:10", "16:20", "--ivf-nlist-factor", "1", "--pq-bytes", "4",
                     "--tune-queries", "30", *FAST])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "efficiency.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    hnsw, ivf = rows["DT-faiss_hnsw"]["ann"], rows["DT-faiss_ivfpq"]["ann"]
    assert hnsw["target"] == 0.5 and hnsw["tune_queries"] == 30
    assert hnsw["params"]["M"] == 8 and hnsw["params"]["efConstruction"] == 10      # the first build met 0.5
    assert ivf["params"]["nlist"] == round(600 ** 0.5) and ivf["params"]["pq_m"] == 4
    assert res["config"]["hnsw_builds"] == ["8:10", "16:20"]


def test_cli_hybrid_rows(tmp_path):
    """--hybrid-beams B: each ACE searcher also as the hybrid operating point; its rows re-rank that
    searcher's own top-B (log-prob + w x cosine), its bytes add the item vectors, and ratios cover it."""
    from ace.bench.efficiency import AceHybridSearch, build_ace_searchers, identifier_config
    from ace.newitems.hybrid import ItemVectorSet

    (tmp_path / "tiny.yaml").write_text(TINY_MODEL)
    texts = [f"a {c} dog on the {p}" for c in ("red", "blue", "green") for p in ("beach", "street", "grass", "snow")]
    (tmp_path / "queries.txt").write_text("\n".join(texts))
    spec = f"tiny={tmp_path / 'tiny.yaml'},dropout=0.0"
    rc = bench_main(["efficiency", "--out", str(tmp_path / "o"), "--sizes", "200", "--dims", "32", "--ace", spec,
                     "--queries", str(tmp_path / "queries.txt"), "--dt", "torch", "--hybrid-beams", "8",
                     "--precisions", "fp32", *TINY_IDS, *FAST])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "efficiency.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"tiny-fp32", "tiny-fp32-hybrid", "DT-torch"}
    assert rows["tiny-fp32-hybrid"]["data_bytes"] == rows["tiny-fp32"]["data_bytes"] + 200 * 32 * 4   # float32 vectors
    assert rows["tiny-fp32-hybrid"]["fixed_bytes"] == rows["tiny-fp32"]["fixed_bytes"]
    assert res["ace_shapes"]["tiny-fp32-hybrid"]["hybrid_storage"] == "float32"
    assert {(r["ace"], r["dt"]) for r in res["ratios"]} == {("tiny-fp32", "DT-torch"), ("tiny-fp32-hybrid", "DT-torch")}

    cfg = EfficiencyConfig(sizes=[200], dims=[32], ace=[spec], precisions=["fp32"], hybrid_beams=8,
                           identifiers="random", id_overrides=["K=16", "codebook_size=16", "max_u=8"], threads=1)
    level_sizes = identifier_config(cfg.id_overrides).level_sizes
    pure, hybrid = build_ace_searchers(cfg, level_sizes, texts, "cpu")
    assert isinstance(hybrid, AceHybridSearch) and hybrid.beams == 8 and pure.beams == 5
    codes = random_codes(200, level_sizes, np.random.default_rng(0))
    pure.trie = hybrid.trie = FlatTrie.from_codes(codes, level_sizes)
    hybrid.vectors = ItemVectorSet.build([str(i) for i in range(200)], mixture_embeddings(200, 32, seed=0), "float32")
    pure.beams = 8
    beams = pure(texts[:4])                                                      # (4, 8) the generative top-8
    ranked = hybrid(texts[:4])
    assert ranked.shape == beams.shape
    for a, b in zip(ranked.tolist(), beams.tolist()):
        assert sorted(a) == sorted(b)                                            # a re-ranking of the same candidates
    hybrid.weight = 0.0
    assert np.array_equal(hybrid(texts[:4]), beams)                             # w = 0: the generative order


def test_a_shape_with_prototype_heads_is_built(tmp_path):
    """A --ace shape with prototype-aware heads (configs/flickr30k_proxy.yaml has them) gets prototype tables
    of the identifier vectors' dimension instead of failing on prototype_dim 0."""
    from ace.bench.efficiency import build_ace_searchers, identifier_config

    (tmp_path / "proto.yaml").write_text(TINY_MODEL + "  prototype_levels: 2\n")
    cfg = EfficiencyConfig(sizes=[50], dims=[24], ace=[f"proto={tmp_path / 'proto.yaml'}"], precisions=["fp32"],
                           identifiers="random", id_overrides=["K=16", "codebook_size=16", "max_u=8"], threads=1)
    level_sizes = identifier_config(cfg.id_overrides).level_sizes
    (s,) = build_ace_searchers(cfg, level_sizes, ["a red dog", "a blue cat"], "cpu")
    assert s.model.config.prototype_levels == 2 and s.model.config.prototype_dim == 24
    s.trie = FlatTrie.from_codes(random_codes(50, level_sizes, np.random.default_rng(0)), level_sizes)
    assert s(["a red dog"]).shape == (1, 5)
