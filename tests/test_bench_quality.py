"""``python -m ace.bench quality`` on tiny caption files: outputs, every method, shared stages, bad input."""
import csv
import json
import os
import subprocess
import sys

import pytest

from ace.bench.quality import ACE_VARIANTS, DEFAULT_METHODS, LABELS, METHODS, NEEDS_LLAMA, main
from tests.conftest import ROOT

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["car", "dog", "house", "boat", "tree"]
TEMPLATES = ["a {c} {t}", "the {t} is {c}", "photo of a {c} {t}", "{c} coloured {t}", "picture showing one {c} {t}"]
TINY = ["model.pretrained_encoder=null", "model.d_model=32", "model.n_heads=2", "model.encoder_layers=1",
        "model.decoder_layers=1", "model.ffn_dim=64", "model.query_vocab_size=60", "model.max_query_length=16",
        "training.batch_size=30", "training.max_steps=8", "training.warmup_steps=2", "training.checkpoint_every=1000",
        "training.progress=false", "identifiers.K=4", "identifiers.codebook_size=4", "identifiers.max_u=16",
        "identifiers.hidden_dims=[16]", "identifiers.latent_dim=8", "identifiers.rqvae_max_steps=20",
        "identifiers.kmeans_n_init=1", "identifiers.codebook_kmeans_iters=3", "identifiers.num_threads=1",
        "dt_tower.epochs=1", "--device", "cpu", "--quiet"]


def items(n_captions=5):
    return [(f"{c}_{t}.jpg", [tpl.format(c=c, t=t) for tpl in TEMPLATES][:n_captions]) for c in COLOURS for t in THINGS]


def karpathy(path, n_captions=5):
    rows = [{"split": "val", "image_name": name, "captions": caps} for name, caps in items(n_captions)]
    rows.append({"split": "val", "image_name": "short.jpg", "captions": ["only", "three", "captions"]})  # skipped
    path.write_text(json.dumps(rows))
    return path


def clotho(path):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
        for name, caps in items():
            w.writerow([name.replace(".jpg", ".wav")] + caps)
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "out"
    code = main(["--captions", str(karpathy(tmp / "caps.json")), "--beams", "2", "5", "--seeds", "0",
                 "--out", str(out), "split.scorer_queries=10", "hybrid.pq_bytes=8", *TINY])
    return code, out


def test_every_method_in_json_and_markdown(full_run):
    code, out = full_run
    assert code == 0
    res = json.loads((out / "quality.json").read_text())
    assert res["items"] == 30 and res["test_queries"] == 60 and res["seeds"] == [0]
    rows = res["rows"]
    assert {r["method"] for r in rows} == set(DEFAULT_METHODS) == set(METHODS) - set(NEEDS_LLAMA)
    for m in [m for m in ACE_VARIANTS if m in DEFAULT_METHODS]:
        assert sorted(r["beams"] for r in rows if r["method"] == m) == [2, 5]
    for r in rows:
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100 and 0 <= r["MRR@10"] <= 100 and r["queries"] == 60
        assert r["seed"] == 0 and r["seconds"]
    # DT zero-shot on these templates: the test caption names colour and thing, so it is far above chance
    zs = next(r for r in rows if r["method"] == "dt_zero_shot")
    assert zs["R@10"] > 50
    assert all("invalid_share" in r for r in rows if r["method"] == "ace_no_cbs")
    # hybrid rows: the `ace` model re-scored (no run folder of their own), with their storage's bytes per item
    hyb = {r["method"]: r for r in rows if r["method"].startswith("ace_hybrid") and r["beams"] == 5}
    assert {m: r["bytes_per_item"] for m, r in hyb.items()} == {"ace_hybrid": 128, "ace_hybrid_int8": 36,
                                                                "ace_hybrid_pq": 8}
    assert all(r["val_queries"] == 10 and 0 <= r["candidate_recall"] <= 100 for r in hyb.values())
    # + dense candidates: a superset of the same model's generative candidates, so the gold is among them as often or more
    for b in (2, 5):
        plain, dense = (next(r for r in rows if r["method"] == m and r["beams"] == b)
                        for m in ("ace_qid_proto_hybrid", "ace_qid_proto_hybrid_dense"))
        assert dense["candidate_recall"] >= plain["candidate_recall"]
    md = (out / "quality.md").read_text()
    for m in DEFAULT_METHODS:
        assert LABELS[m] in md
    assert "python -m ace.bench quality --captions" in md


def test_int8_variant_decodes_the_quantised_model(full_run, monkeypatch):
    import ace.serving.retriever as retriever_module
    from ace.bench.quality import decode_run

    _, out = full_run
    res = json.loads((out / "quality.json").read_text())
    assert LABELS["ace_int8"] in (out / "quality.md").read_text()
    assert {r["beams"] for r in res["rows"] if r["method"] == "ace_int8"} == {2, 5}
    calls = []
    real = retriever_module.quantize_dynamic_int8
    monkeypatch.setattr(retriever_module, "quantize_dynamic_int8", lambda m: calls.append(1) or real(m))
    run_dir = out / "runs" / "seed0" / "ace"
    queries = [q for q, _ in json.loads((run_dir / "test_queries.json").read_text())]
    fp32, _, _ = decode_run(run_dir, queries, 5, constrained=True, device="cpu")
    assert calls == []
    int8, _, _ = decode_run(run_dir, queries, 5, constrained=True, device="cpu", quantize=True)
    assert calls == [1]
    agree = sum(a[:1] == b[:1] for a, b in zip(fp32, int8)) / len(queries)
    assert agree >= 0.8  # int8 keeps (nearly) every top-1 of the fp32 model


def test_variant_configs_and_shared_stages(full_run):
    _, out = full_run
    res = json.loads((out / "quality.json").read_text())
    folders = {v[0] for m, v in ACE_VARIANTS.items() if m in DEFAULT_METHODS}
    assert set(res["configs"]) == {f"{f}/seed0" for f in folders} | {"dt_trained/seed0"}
    cfg = res["configs"]
    # the recipe (issue 19): levers 1 + 3, R-Drop off; ace_kl puts the paper's R-Drop back; ace_recipe_v1 is the
    # recipe before the levers
    assert cfg["ace_kl/seed0"]["training"]["omega"] == 0.15 and cfg["ace/seed0"]["training"]["omega"] == 0
    assert cfg["ace/seed0"]["identifiers"]["vectors"] == "item_plus_queries" and cfg["ace/seed0"]["model"]["prototype_levels"] == 2
    v1 = cfg["ace_recipe_v1/seed0"]
    assert (v1["identifiers"]["vectors"], v1["model"]["prototype_levels"], v1["training"]["omega"]) == ("item", 0, 0.15)
    assert cfg["ace_no_fusion/seed0"]["model"]["fusion"] is False
    assert cfg["ace_no_kmeans/seed0"]["identifiers"]["use_kmeans"] is False
    assert cfg["ace_no_rqvae/seed0"]["identifiers"]["quantizer"] == "kmeans"
    assert cfg["ace/seed0"]["corpus"]["path"].endswith("caps.json") and cfg["ace/seed0"]["training"]["seed"] == 0
    runs = res["runs"]
    assert "identifiers" in runs["ace/seed0"]["stages_ran"]
    # same identifiers config: copied from the earlier run, not refitted; other identifiers: refitted
    assert "identifiers" not in runs["ace_kl/seed0"]["stages_ran"] and "train" in runs["ace_kl/seed0"]["stages_ran"]
    assert "identifiers" in runs["ace_recipe_v1/seed0"]["stages_ran"]
    assert "identifiers" in runs["ace_no_kmeans/seed0"]["stages_ran"]
    assert "encode" not in runs["ace_no_rqvae/seed0"]["stages_ran"]
    assert runs["ace_no_kmeans/seed0"]["identifiers"]["codebook_usage"][0]["size"] == 1
    for f in folders:
        assert (out / "runs" / "seed0" / f / "model").is_dir()


def test_csv_file_and_method_subset(tmp_path):
    out = tmp_path / "out"
    code = main(["--captions", str(clotho(tmp_path / "clotho_captions_x.csv")), "--methods", "dt_doc_plus_queries",
                 "ace", "--beams", "3", "--out", str(out), *TINY])
    assert code == 0
    res = json.loads((out / "quality.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["dt_doc_plus_queries", "ace"]
    assert res["rows"][1]["beams"] == 3 and res["format"] == "auto"


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ace.bench", "quality", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_missing_file_exits_2_without_traceback(tmp_path):
    p = run_cli("--captions", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "caption file not found" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--methods", "ace", "bm25"], "unknown method(s) bm25"),
    (["--beams", "0"], "beam sizes must be >= 1"),
    (["model.no_such_key=1"], "unknown config key"),
    (["--methods", "ace_hybrid"], "pass split.scorer_queries=N"),
])
def test_bad_arguments(tmp_path, capsys, args, message):
    code = main(["--captions", str(karpathy(tmp_path / "c.json")), "--out", str(tmp_path / "o"), *args, "--quiet"])
    assert code == 2 and message in capsys.readouterr().err


def test_fewer_than_five_captions(tmp_path, capsys):
    code = main(["--captions", str(karpathy(tmp_path / "c.json", n_captions=4)), "--out", str(tmp_path / "o"),
                 "--methods", "dt_zero_shot", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "has 5 captions" in err and "Traceback" not in err


def test_paraphrase_variants_need_the_llama_extra(tmp_path, capsys, monkeypatch):
    """ace_qid_proto_para(_hybrid) are not in the default methods; asked for without llama-cpp-python they stop
    before any work with the install hint (no silent fallback to the slow transformers runtime)."""
    import importlib.util

    assert set(NEEDS_LLAMA) <= set(METHODS) and not set(NEEDS_LLAMA) & set(DEFAULT_METHODS)
    assert ACE_VARIANTS["ace_qid_proto_para_hybrid"][0] == "ace_qid_proto_para"
    assert "querygen.keep_captions=true" in ACE_VARIANTS["ace_qid_proto_para"][1]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    code = main(["--captions", str(karpathy(tmp_path / "c.json")), "--out", str(tmp_path / "o"),
                 "--methods", "ace_qid_proto_para", "--quiet"])
    assert code == 2 and 'pip install -e ".[llama]"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_paraphrase_variant_config_keeps_captions_and_takes_the_count_from_the_command_line(tmp_path):
    from ace.bench.quality import load_bench_config, parse_args, variant_config

    caps = karpathy(tmp_path / "c.json")
    base, _ = load_bench_config(parse_args(["--captions", str(caps)]).config_path)
    for extra, n in (([], 9), (["querygen.num_queries=3"], 3)):
        setup = parse_args(["--captions", str(caps), *extra, "--methods", "ace_qid_proto"])
        q = variant_config(base, setup, "ace_qid_proto_para", 0, tmp_path / "e.npz").querygen
        assert (q.backend, q.runtime, q.keep_captions, q.num_queries, q.caption_indices) == \
            ("paraphrase", "llama_cpp", True, n, [0, 1, 2])
        assert variant_config(base, setup, "ace_qid_proto", 0, tmp_path / "e.npz").querygen.backend == "captions"
