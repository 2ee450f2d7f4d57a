"""benchmarks/quality_vs_n.py: the quality-vs-N table and plot draw only what each quality.json measured."""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("quality_vs_n", Path(__file__).resolve().parents[1] / "benchmarks" / "quality_vs_n.py")
qvn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qvn)


def _quality(path: Path, items: int, rows: list[tuple[str, int, float, float]]) -> Path:
    path.write_text(json.dumps({"items": items, "rows": [{"method": m, "seed": s, "R@1": r1, "R@10": r10}
                                                        for m, s, r1, r10 in rows]}))
    return path


def test_table_and_plot_show_measured_points_only(tmp_path):
    a = _quality(tmp_path / "a.json", 1000, [("dt_doc_plus_queries", 0, 70.0, 93.0), ("ace_qid_proto", 0, 62.0, 91.0),
                                             ("ace_qid_proto", 1, 64.0, 92.0)])
    b = _quality(tmp_path / "b.json", 5000, [("dt_doc_plus_queries", 0, 50.0, 81.0)])
    png = tmp_path / "q.png"
    text = qvn.main([str(b), str(a), "--methods", "dt_doc_plus_queries", "ace_qid_proto", "--png", str(png)])
    lines = text.splitlines()
    assert lines[2].startswith("| 1,000 |") and lines[3].startswith("| 5,000 |")      # sorted by N
    assert "63.0 / 91.5 (-7.0)" in lines[2]                      # mean of the two seeds, gap to DT doc+queries
    assert "not run" in lines[3] and "50.0 / 81.0" in lines[3]   # ACE was not measured at 5k: no figure
    assert png.is_file() and png.stat().st_size > 0
    assert qvn.plot({1000: {"x": {"R@1": 1.0, "R@10": 2.0, "seeds": 1}}}, ["x", "missing"], tmp_path / "p.png") == ["x"]


def test_bad_inputs_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        qvn.main([str(bad)])
    with pytest.raises(SystemExit, match="not found"):
        qvn.main([str(tmp_path / "none.json")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no items / rows"):
        qvn.main([str(other)])
    a = _quality(tmp_path / "a.json", 1000, [("dt_doc_plus_queries", 0, 70.0, 93.0)])
    with pytest.raises(SystemExit, match="two files for N = 1000"):
        qvn.main([str(a), str(a)])
