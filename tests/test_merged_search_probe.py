"""benchmarks/merged_search_probe.py: the added-item boost sweep re-ranks merged hits by source."""
import importlib.util
from pathlib import Path

from ace.serving.retriever import SearchHit

_spec = importlib.util.spec_from_file_location(
    "merged_search_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "merged_search_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _hit(iid, score, source):
    return SearchHit(iid, "image", score, (0,), source, None, "hybrid")


def test_boost_lifts_only_fallback_hits_and_keeps_ties_in_order():
    row = [_hit("a", -1.0, "generative"), _hit("x", -1.5, "fallback"), _hit("b", -2.0, "dense"),
           _hit("y", -3.0, "fallback")]
    assert probe.boosted([row], 0.0, k=4) == [["a", "x", "b", "y"]]
    assert probe.boosted([row], 0.5, k=4) == [["a", "x", "b", "y"]]      # x ties a: the earlier hit stays first
    assert probe.boosted([row], 1.5, k=3) == [["x", "a", "y"]]            # y (-1.5) ties a and follows it
    assert probe.boosted([row], 10.0, k=2) == [["x", "y"]]


def test_boost_sweep_weights_each_query_set_by_its_items():
    old = [[_hit("a", -1.0, "generative"), _hit("x", -1.2, "fallback")]]
    added = [[_hit("a", -1.0, "generative"), _hit("x", -1.2, "fallback")]]
    pairs = {"old": [("q1", "a")], "added": [("q2", "x")]}
    rows = probe.boost_sweep({"old": old, "added": added}, pairs, {"old": 3, "added": 1}, [0.0, 1.0])
    assert rows[0]["old"]["R@1"] == 100.0 and rows[0]["added"]["R@1"] == 0.0
    assert rows[0]["items_weighted"]["R@1"] == 75.0
    assert rows[1]["old"]["R@1"] == 0.0 and rows[1]["added"]["R@1"] == 100.0
    assert rows[1]["items_weighted"]["R@1"] == 25.0 and rows[1]["items_weighted"]["R@10"] == 100.0


def test_fit_boost_takes_the_largest_margin_over_both_bars_nearest_zero():
    def row(b, old, added):
        return {"boost": b, "old": {"R@1": 0.0, "R@10": old}, "added": {"R@1": 0.0, "R@10": added}}
    rows = [row(0.0, 75.0, 78.0), row(1.0, 74.5, 79.5), row(2.0, 74.0, 80.5), row(3.0, 73.0, 81.0),
            row(-1.0, 75.0, 77.0)]
    fit = probe.fit_boost(rows, {"old": 72.0, "added": 80.0})
    assert fit["boost"] == 3.0 and fit["margin"] == 1.0          # margins -2, -0.5, 0.5, 1.0, -3
    tie = probe.fit_boost([row(2.0, 74.0, 81.0), row(-1.0, 74.0, 81.0), row(0.5, 74.0, 81.0)],
                          {"old": 72.0, "added": 80.0})
    assert tie["boost"] == 0.5                                    # equal margins: the boost nearest 0
