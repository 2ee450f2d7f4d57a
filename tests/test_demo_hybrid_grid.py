"""benchmarks/demo_hybrid_grid.py: the what-if rule for dense candidates' log-probs (beam_floor)."""
import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("demo_hybrid_grid", Path(__file__).resolve().parents[1] / "benchmarks" / "demo_hybrid_grid.py")
grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grid)


def test_beam_floor_raises_dense_candidates_to_the_weakest_beam():
    lp = np.array([[-0.5, -2.0, -9.0, -1.0, -np.inf],     # 2 beams, 3 dense (one a pad)
                   [-0.1, -np.inf, -7.0, -8.0, -6.0]])   # a query with one beam candidate
    out = grid.beam_floor(lp, 2)
    np.testing.assert_array_equal(out[:, :2], lp[:, :2])                  # beam candidates untouched
    np.testing.assert_array_equal(out[0, 2:], [-2.0, -1.0, -np.inf])      # raised to -2, a higher one kept, pads stay
    np.testing.assert_array_equal(out[1, 2:], [-0.1, -0.1, -0.1])
    np.testing.assert_array_equal(lp[0, 2], -9.0)                         # the input is not modified


def test_ranks_of_and_summary():
    ranked = np.array([[3, 1, 2], [5, 6, 7]])
    pos = grid.ranks_of(ranked, [{1}, {9}])
    assert pos.tolist() == [1, -1]
    s = grid.summary(pos)
    assert s["R@1"] == 0.0 and s["R@5"] == 50.0 and s["MRR"] == 25.0
