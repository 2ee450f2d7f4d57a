"""End-to-end learning: a small AceModel learns the synthetic task and generalises to held-out paraphrases."""
from __future__ import annotations

import json
import time

import pytest
import torch

from ace.bench.synthetic import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, make_synthetic_task, train_synthetic
from ace.training.evaluate import evaluate_retriever
from ace.training.loop import TrainConfig


def test_synthetic_task_shape():
    task = make_synthetic_task(50, seed=1)
    assert len(set(task.attributes)) == 50 and len(task.item_ids) == 50
    assert task.embeddings.shape == (50, 64)
    assert torch.allclose(torch.from_numpy(task.embeddings).norm(dim=1), torch.ones(50), atol=1e-5)
    assert len(task.train_pairs) == 50 * len(TRAIN_TEMPLATES) and len(task.val_pairs) == 50 * len(HELDOUT_TEMPLATES)
    assert not {q for q, _ in task.train_pairs} & {q for q, _ in task.val_pairs}  # paraphrases are held out
    with pytest.raises(ValueError, match="n_items"):
        make_synthetic_task(0)


@pytest.mark.slow
def test_learns_heldout_paraphrases(tmp_path):
    """240 items, 4 training templates, 3 held-out templates: Recall@1 > 0.9 within about a CPU-minute."""
    task = make_synthetic_task(240, seed=0)
    cfg = TrainConfig(lr=5e-3, warmup_steps=50, batch_size=64, max_steps=300, checkpoint_every=300, eval_every=0,
                      num_beams=10, eval_top_k=10, log_every=50, seed=0, progress=False)
    cpu0, wall0 = time.process_time(), time.time()
    result, parts = train_synthetic(task, tmp_path, cfg)
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    metrics = result.final_metrics
    print(f"\nsynthetic end-to-end: R@1 {metrics['R@1']:.2f}  R@5 {metrics['R@5']:.2f}  MRR@10 {metrics['MRR@10']:.2f}"
          f"  CPU {cpu:.1f} s  wall {wall:.1f} s  ({metrics['queries']} held-out queries)")
    assert metrics["queries"] == len(task.val_pairs)
    assert metrics["R@1"] > 90.0
    # The CPU-minute budget is fixed by the config (300 steps); the time itself is a benchmark figure
    # (printed above, recorded in BENCHMARKS.md), not a unit-test assertion.
    # the exported model reproduces the figure through the public evaluation entry point
    from ace.model.modeling import AceModel

    model = AceModel.from_pretrained(result.model_dir)
    again = evaluate_retriever(model, parts["query_tokenizer"], parts["id_tokenizer"], parts["vocab"], task.val_pairs,
                               num_beams=10, top_k=10)
    assert again["R@1"] == pytest.approx(metrics["R@1"])
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["eval"]["R@1"] == pytest.approx(metrics["R@1"])
