import numpy as np
import pytest

from ace.metrics import mrr_at_k, recall_at_k, retrieval_metrics, topk_from_scores


def test_hand_computed_recall_and_mrr():
    rankings = [["a", "b", "c"], ["x", "y"], ["q"], []]
    targets = ["a", "y", "z", "a"]
    # ranks: 0, 1, absent, absent
    assert recall_at_k(rankings, targets, 1) == pytest.approx(1 / 4)
    assert recall_at_k(rankings, targets, 2) == pytest.approx(2 / 4)
    assert mrr_at_k(rankings, targets, 10) == pytest.approx((1 + 0.5) / 4)
    assert mrr_at_k(rankings, targets, 1) == pytest.approx(1 / 4)
    m = retrieval_metrics(rankings, targets)
    assert m["R@1"] == pytest.approx(25.0) and m["R@10"] == pytest.approx(50.0)
    assert m["MRR@10"] == pytest.approx(37.5) and m["queries"] == 4


def test_target_beyond_k_does_not_count():
    rankings = [list(range(20))]
    assert recall_at_k(rankings, [15], 10) == 0.0
    assert mrr_at_k(rankings, [15], 10) == 0.0
    assert recall_at_k(rankings, [15], 16) == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="rankings"):
        recall_at_k([[1]], [1, 2], 1)
    with pytest.raises(ValueError, match="at least one"):
        recall_at_k([], [], 1)
    with pytest.raises(ValueError, match="2-D"):
        topk_from_scores(np.zeros(3), 1)


def test_topk_from_scores_order():
    s = np.array([[0.1, 0.9, 0.5, 0.7], [3, 2, 1, 0]], dtype=float)
    assert topk_from_scores(s, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    assert topk_from_scores(s, 10).shape == (2, 4)


def test_hand_computed_r5_r10_mrr10_with_invalid_slots():
    # 5 queries; None marks an invalid identifier (unconstrained decoding) that keeps its slot as a miss
    rankings = [
        ["t0", "x", "y"],                                  # rank 1
        [None, None, "t1"],                                # rank 3 (invalid ids do not move it up)
        ["a", "b", "c", "d", "e", "t2"],                   # rank 6: R@10 but not R@5
        ["a"] * 10 + ["t3"],                               # rank 11: beyond @10
        [None] * 10,                                       # never
    ]
    targets = ["t0", "t1", "t2", "t3", "t4"]
    m = retrieval_metrics(rankings, targets)
    assert m["R@1"] == pytest.approx(100 * 1 / 5)
    assert m["R@5"] == pytest.approx(100 * 2 / 5)
    assert m["R@10"] == pytest.approx(100 * 3 / 5)
    assert m["MRR@10"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 6) / 5)   # = 30.0
