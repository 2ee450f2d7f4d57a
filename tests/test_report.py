import json

import numpy as np

from ace.pipeline.report import plot_identifier_distribution, plot_recall, plot_training_curves, read_jsonl, write_report
from ace.run_folder import RunFolder, write_json_atomic


def test_stage_markers(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.is_done("encode", "abc")
    run.mark_done("encode", "abc", {"items": 3})
    assert run.is_done("encode", "abc") and not run.is_done("encode", "other")
    assert run.stage_record("encode")["items"] == 3
    (run.path / "stages" / "encode.json").write_text("{torn")
    assert not run.is_done("encode", "abc")  # a torn marker re-runs the stage
    run.mark_done("encode", "abc")
    run.invalidate("encode")
    assert not run.is_done("encode", "abc")


def test_atomic_json_and_torn_log(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"x": np.float32(1.5), "n": np.int64(3)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": 1.5, "n": 3}
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}]


def test_report_and_plots(tmp_path):
    (tmp_path / "plots").mkdir()
    rows = [{"step": s, "loss": 5.0 / s} for s in range(1, 20)] + [{"step": 10, "val/R@1": 40.0}, {"step": 19, "val/R@1": 60.0}]
    p1 = plot_training_curves(rows, tmp_path / "plots" / "curves.png")
    p2 = plot_recall({"image": {"R@1": 50.0, "R@5": 70.0, "R@10": 80.0, "MRR@10": 60.0}}, tmp_path / "plots" / "recall.png")
    codes = np.random.default_rng(0).integers(0, 8, size=(100, 4))
    p3 = plot_identifier_distribution(codes, ["k", "v1", "v2", "u"], tmp_path / "plots" / "ids.png")
    for p in (p1, p2, p3):
        assert p.is_file() and p.stat().st_size > 1000
    metrics = {"by_group": {"all": {"R@1": 50.0, "R@5": 70.0, "R@10": 80.0, "MRR@10": 60.0, "queries": 4}}}
    text = write_report(tmp_path, title="demo", metrics=metrics, plots=[p1, p2, p3]).read_text()
    assert "| all | 50.0 | 70.0 | 80.0 | 60.0 | 4 |" in text and "plots/ids.png" in text
