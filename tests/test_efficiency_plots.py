"""The recall-vs-throughput rule (ace.bench.efficiency_plots): a point's recall is a trained figure of
the same shape, precision, beam width and mode, never another model's."""
import json

import pytest

from ace.bench.efficiency_plots import (PlotError, drawable, model_arch, parse_trained, plot, quality_rows,
                                        trained_figures)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = {"d_model": 32, "n_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ffn_dim": 64}
BIG = {"d_model": 384, "n_heads": 6, "encoder_layers": 3, "decoder_layers": 2, "ffn_dim": 1024,
       "pretrained_encoder": "minilm"}


def row(method, family, qps, n=1000, dim=384):
    return {"device": "cpu", "n": n, "dim": dim, "family": family, "method": method, "qps_median": qps}


@pytest.fixture
def result():
    rows = [row(m, f, q) for m, f, q in [("small-fp32", "ACE", 80.0), ("small-int8", "ACE", 95.0),
                                         ("big-fp32", "ACE", 25.0), ("DT-torch", "DT", 12.0),
                                         ("DT-faiss_hnsw", "DT", 40.0)]]
    rows += [row("DT-torch", "DT", 10.0, dim=1024)]
    return {"config": {"beams": 5}, "text_encoder_dim": 384, "rows": rows,
            "ace_shapes": {"small-fp32": {"arch": model_arch(SMALL)}, "small-int8": {"arch": model_arch(SMALL)},
                           "big-fp32": {"arch": model_arch(BIG)}}}


@pytest.fixture
def quality(tmp_path):
    """A quality.json whose `ace` run is the SMALL shape (fp32 + int8 rows) and a DT row."""
    p = tmp_path / "quality.json"
    p.write_text(json.dumps({
        "summary": [{"method": "ace", "beams": 5, "R@1": 17.0, "R@10": 40.0, "seeds": [0]},
                    {"method": "ace_int8", "beams": 5, "R@1": 16.0, "R@10": 38.0, "seeds": [0]},
                    {"method": "ace", "beams": 10, "R@1": 18.0, "R@10": 45.0, "seeds": [0]},
                    {"method": "ace_hybrid", "beams": 5, "R@1": 30.0, "R@10": 60.0, "seeds": [0]},
                    {"method": "dt_doc_plus_queries", "beams": None, "R@1": 66.8, "R@10": 91.4}],
        "configs": {"ace/seed0": {"model": {**SMALL, "dropout": 0.1}}}}))
    return p


def run_folder(tmp_path, arch, beams=(5, 50), hybrid=False):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps({**arch, "pretrained_encoder": arch.get(
        "pretrained_encoder") and "/somewhere/else/all-MiniLM-L6-v2", "fusion": True}))
    (run / "metrics.json").write_text(json.dumps({"beams": {str(b): {"R@1": 50.0 + b, "R@10": 80.0 + b / 10}
                                                            for b in beams}}))
    if hybrid:
        (run / "hybrid").mkdir()
    return run


def test_a_shape_without_a_trained_figure_gets_no_recall(result, quality):
    figs = trained_figures(result, [f"small-fp32={quality}#ace beam 5"])
    assert set(figs) == {"small-fp32"} and figs["small-fp32"]["R@10"] == 40.0
    rows = {(r["method"], r["dim"]): r for r in result["rows"]}
    assert drawable(rows["small-fp32", 384], figs, 384)["R@10"] == 40.0
    for m in ("small-int8", "big-fp32", "DT-torch", "DT-faiss_hnsw"):          # none may borrow small-fp32's figure
        assert drawable(rows[m, 384], figs, 384) is None


# a figure of another model or setting, from the quality.json ({q}), and the error that must name why
REFUSED = [("big-fp32={q}#ace beam 5", "another shape.*d_model 32 != 384"),
           ("small-int8={q}#ace beam 5", "fp32 model's figure"),
           ("small-fp32={q}#ace_int8 beam 5", "int8 model's figure"),
           ("small-fp32={q}#ace beam 10", "beam 10, this run with 5"),
           ("small-fp32={q}#ace_hybrid beam 5", "hybrid mode"),
           ("DT-faiss_hnsw={q}#dt_doc_plus_queries", "exact DT rows only"),
           ("DT-torch={q}#ace beam 5", "not a dual-tower figure"),
           ("small-fp32={q}#dt_doc_plus_queries", "not an ACE model's figure"),
           ("nope-fp32={q}#ace beam 5", "did not measure"),
           ("small-fp32={q}#ace beam 7", "is not a method of")]


@pytest.mark.parametrize("spec, match", REFUSED)
def test_another_models_or_settings_figure_is_refused(result, quality, spec, match):
    with pytest.raises(PlotError, match=match):
        trained_figures(result, [spec.format(q=quality)])


def test_the_same_precision_beam_and_mode_is_accepted(result, quality):
    assert trained_figures(result, [f"small-int8={quality}#ace_int8 beam 5"])["small-int8"]["R@10"] == 38.0


def test_dt_figures_only_for_exact_rows_at_the_encoders_dimension(result, quality):
    figs = trained_figures(result, [f"DT-torch={quality}#dt_doc_plus_queries"])
    rows = {(r["method"], r["dim"]): r for r in result["rows"]}
    assert drawable(rows["DT-torch", 384], figs, 384)["R@10"] == 91.4
    assert drawable(rows["DT-torch", 1024], figs, 384) is None                 # random projection: not that model


def test_bad_trained_arguments_are_a_clear_error():
    with pytest.raises(PlotError, match="twice"):
        parse_trained(["a=x", "a=y"])
    with pytest.raises(PlotError, match="METHOD=RUN_DIR"):
        parse_trained(["small-fp32"])


def test_run_folder_figures(result, tmp_path):
    run = run_folder(tmp_path, BIG)
    fig = trained_figures(result, [f"big-fp32={run}"])["big-fp32"]
    assert fig["R@10"] == 80.5 and fig["source"].endswith("metrics.json")    # beam 5 of the eval stage
    with pytest.raises(PlotError, match="another shape"):
        trained_figures(result, [f"small-fp32={run}"])
    with pytest.raises(PlotError, match="fp32 model's figure"):
        trained_figures(result, [f"small-int8={run_folder(tmp_path / 'b', SMALL)}"])    # a run folder is fp32


def test_run_folder_at_another_beam_or_hybrid_is_refused(result, tmp_path):
    with pytest.raises(PlotError, match="no figures at beam 5"):
        trained_figures(result, [f"big-fp32={run_folder(tmp_path / 'a', BIG, beams=(10, 50))}"])
    with pytest.raises(PlotError, match="hybrid mode"):
        trained_figures(result, [f"big-fp32={run_folder(tmp_path / 'b', BIG, hybrid=True)}"])
    with pytest.raises(PlotError, match="not found"):
        trained_figures(result, [f"big-fp32={tmp_path / 'missing'}"])


def test_plot_draws_trained_points_and_throughput_only_lines(result, quality, tmp_path):
    figs = trained_figures(result, [f"small-fp32={quality}#ace beam 5", f"DT-torch={quality}#dt_doc_plus_queries"])
    paths, notes = plot(result, tmp_path, figs, batch=100, threads=1)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["throughput_vs_corpus_size.png", "recall_vs_throughput.png"]
    assert (tmp_path / "recall_vs_throughput.png").read_bytes()[:8] == PNG_MAGIC
    drawn, only = notes[0].split("throughput only")
    assert "small-fp32 = " in drawn and "DT-torch = " in drawn
    assert "big-fp32" in only and "small-int8" in only and "DT-faiss_hnsw" in only


def test_plot_without_figures_draws_speed_only(result, tmp_path):
    paths, notes = plot(result, tmp_path, {}, batch=100, threads=1)
    assert len(paths) == 1 and not (tmp_path / "recall_vs_throughput.png").exists()
    assert "was not drawn" in notes[0]


def test_quality_rows_and_encoder_names():
    rows = quality_rows({"rows": [{"method": "ace", "beams": 5, "seed": 0, "R@10": 1.0},
                                  {"method": "ace", "beams": 5, "seed": 1, "R@10": 2.0},
                                  {"method": "dt_zero_shot", "R@10": 3.0}, {"method": "x"}]})
    assert set(rows) == {"ace beam 5", "dt_zero_shot"} and rows["ace beam 5"]["R@10"] == 1.0
    assert model_arch({"pretrained_encoder": "all-MiniLM-L6-v2"})["pretrained_encoder"] == "minilm"
    assert model_arch({"pretrained_encoder": None})["pretrained_encoder"] is None


def test_hybrid_rows_take_only_the_hybrid_figure_of_their_top_b_and_storage(result, quality, tmp_path):
    """A "-hybrid" row (--hybrid-beams) is drawn at a hybrid-mode figure of the same top-B and item-vector
    storage; a pure figure, another B or another storage is refused, and pure rows still refuse hybrid figures."""
    result["rows"].append(row("small-fp32-hybrid", "ACE", 30.0))
    result["config"]["hybrid_beams"] = 50
    result["ace_shapes"]["small-fp32-hybrid"] = {"arch": model_arch(SMALL), "hybrid_storage": "float32"}
    data = json.loads(quality.read_text())
    data["summary"] += [{"method": "ace_hybrid", "beams": 50, "R@1": 33.0, "R@10": 66.0, "seeds": [0]},
                        {"method": "ace_hybrid_int8", "beams": 50, "R@1": 32.0, "R@10": 65.0, "seeds": [0]},
                        {"method": "ace", "beams": 50, "R@1": 20.0, "R@10": 50.0, "seeds": [0]}]
    quality.write_text(json.dumps(data))
    figs = trained_figures(result, [f"small-fp32-hybrid={quality}#ace_hybrid beam 50"])
    assert figs["small-fp32-hybrid"]["R@10"] == 66.0 and figs["small-fp32-hybrid"]["storage"] == "float32"
    for spec, match in [("ace beam 50", "pure generative search's figure"),
                        ("ace_hybrid_int8 beam 50", "int8 item vectors, this row with float32"),
                        ("ace_hybrid beam 5", "beam 5, this run with 50")]:
        with pytest.raises(PlotError, match=match):
            trained_figures(result, [f"small-fp32-hybrid={quality}#{spec}"])
    with pytest.raises(PlotError, match="hybrid mode"):
        trained_figures(result, [f"small-fp32={quality}#ace_hybrid beam 50"])
    run = run_folder(tmp_path, SMALL, beams=(50,), hybrid=True)
    (run / "hybrid" / "scorer.json").write_text(json.dumps({"storage": "float32"}))
    assert trained_figures(result, [f"small-fp32-hybrid={run}"])["small-fp32-hybrid"]["R@10"] == 85.0
