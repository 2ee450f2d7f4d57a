"""Prefix-prototype teacher (ace/training/distill.py): sibling targets, leave-one-out, loss, training hook."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ace.training.distill import PrefixTeacher, TeacherError, distillation_loss
from ace.model.tokens import IdentifierVocab
from ace.training.loop import TrainConfig, train_retriever
from tests.test_training import make_model, small_cfg, task  # noqa: F401  (module fixture)

# 4 items, identifiers (k, v, u): items 0 and 1 share k=0; items 2 and 3 share k=1
CODES = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1]])
SIZES = [2, 2, 2]
E = np.eye(3, dtype=np.float32)


def teacher(tau=1.0):
    # item i has two queries; item 0: e0, e0; item 1: e1, e1; item 2: e2, e2; item 3: e2, e0
    q = np.array([E[0], E[0], E[1], E[1], E[2], E[2], E[2], E[0]])
    rows = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    return PrefixTeacher.from_queries(q, rows, CODES, IdentifierVocab(SIZES), tau=tau), q, rows


def test_targets_are_the_siblings_of_each_prefix():
    t, q, rows = teacher()
    vocab = IdentifierVocab(SIZES)
    ids, probs = t.targets(torch.tensor(q), torch.tensor(rows), leave_one_out=False)
    assert ids.shape == (8, 3, 2)
    # level 0: both clusters are siblings of the root, for every query
    assert (ids[:, 0] == torch.tensor([vocab.offsets[0], vocab.offsets[0] + 1])).all()
    # item 2 and item 3 share (1, 0): their u level offers u=0 and u=1; item 0's u level only u=0
    assert ids[4, 2].tolist() == [vocab.offsets[2], vocab.offsets[2] + 1]
    assert ids[0, 2].tolist() == [vocab.offsets[2], -1]
    assert torch.allclose(probs.sum(-1), torch.ones(8, 3))
    assert probs[0, 2, 1] == 0  # padding gets no mass


def test_level_zero_matches_a_hand_computed_softmax():
    t, q, rows = teacher(tau=2.0)
    _, probs = t.targets(torch.tensor(q[:1]), torch.tensor(rows[:1]), leave_one_out=False)
    # prototypes: p0 = e0, p1 = e1, p2 = e2, p3 = unit(e2 + e0); cluster 0 = unit(e0 + e1), cluster 1 = unit(p2 + p3)
    p3 = (E[2] + E[0]) / np.sqrt(2)
    c0 = (E[0] + E[1]) / np.linalg.norm(E[0] + E[1])
    c1 = (E[2] + p3) / np.linalg.norm(E[2] + p3)
    logits = 2.0 * np.array([E[0] @ c0, E[0] @ c1])
    expected = np.exp(logits) / np.exp(logits).sum()
    assert np.allclose(probs[0, 0].numpy(), expected, atol=1e-6)


def test_leave_one_out_removes_the_query_from_its_own_prototype():
    t, q, rows = teacher(tau=5.0)
    # query 7 (e0) of item 3, whose other query is e2: without LOO its own prototype leans to e0
    _, with_q = t.targets(torch.tensor(q[7:8]), torch.tensor(rows[7:8]), leave_one_out=False)
    _, loo = t.targets(torch.tensor(q[7:8]), torch.tensor(rows[7:8]), leave_one_out=True)
    # u level between items 2 (u=0) and 3 (u=1): LOO makes item 3's branch = e2, same as item 2's
    assert with_q[0, 2, 1] > 0.5
    assert abs(loo[0, 2, 1].item() - 0.5) < 1e-5


def test_distillation_loss_is_zero_when_student_matches_and_ignores_padding():
    t, q, rows = teacher(tau=3.0)
    ids, probs = t.targets(torch.tensor(q), torch.tensor(rows))
    V = IdentifierVocab(SIZES).vocab_size
    logits = torch.full((8, 3, V), -5.0)
    logits.scatter_(-1, ids.clamp_min(0), torch.log(probs.clamp_min(1e-9)))
    assert distillation_loss(logits, ids, probs).item() == pytest.approx(0.0, abs=1e-5)
    wrong = torch.randn(8, 3, V)
    assert distillation_loss(wrong, ids, probs).item() > 0.01
    with pytest.raises(TeacherError, match="shapes"):
        distillation_loss(wrong[:, :2], ids, probs)


def test_bad_teacher_inputs():
    vocab = IdentifierVocab(SIZES)
    with pytest.raises(TeacherError, match="no training query"):
        PrefixTeacher.from_queries(E[:2], np.array([0, 1]), CODES, vocab)
    with pytest.raises(TeacherError, match="NaN"):
        PrefixTeacher.from_queries(np.full((4, 3), np.nan), np.arange(4), CODES, vocab)
    with pytest.raises(TeacherError, match="rows"):
        PrefixTeacher.from_queries(np.ones((4, 3)), np.array([0, 1, 2, 9]), CODES, vocab)
    with pytest.raises(TeacherError, match="tau"):
        PrefixTeacher.from_queries(np.ones((4, 3)), np.arange(4), CODES, vocab, tau=0)


def test_training_with_the_teacher_logs_the_distillation_term(task, tmp_path):  # noqa: F811
    rows = np.array([i for _, i in task.pairs])
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(task.pairs), 8)).astype(np.float32)
    t = PrefixTeacher.from_queries(vecs, rows, task.idtok.codes, task.vocab, tau=10.0)
    cfg = small_cfg(distill_weight=1.0, max_steps=4)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path / "a")
    train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path / "b",
                    teacher=(t, vecs))
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in log if "kd" in r]
    assert len(kd) == 4 and all(k > 0 for k in kd)
    with pytest.raises(ValueError, match="distill_tau"):
        TrainConfig(distill_tau=0)


def test_frozen_encoder_keeps_its_weights_and_stays_in_eval_mode(task, tmp_path):  # noqa: F811
    model = make_model(task)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    dec_before = model.decoder.head.weight.clone()
    train_retriever(model, task.qtok, task.idtok, task.vocab, task.pairs, task.pairs[:6],
                    small_cfg(freeze_encoder=True, max_steps=4, eval_every=2), tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(dec_before, model.decoder.head.weight)
    model.train()
    assert model.decoder.training and not model.encoder.training


# ----------------------------------------------------------------------------- anchor to the previous model (fold)


def _batch(task):
    from ace.training.pairs import encode_pairs

    enc = encode_pairs(task.pairs[:8], task.qtok, task.idtok, task.vocab, max_query_length=16)
    return enc.batch(torch.arange(8))


def test_anchor_term_is_zero_for_equal_models_and_positive_once_they_differ(task):
    from ace.training.distill import PreviousModel, anchor_kl
    from ace.training.losses import ace_loss

    model = make_model(task).eval()
    previous = PreviousModel(model)
    batch = _batch(task)
    rows = torch.ones(8, dtype=torch.bool)
    teacher = previous.logits(batch)
    out = ace_loss(model, batch, omega=0.0, anchor=(teacher, rows, 1.0))
    assert out.anchor is not None and float(out.anchor) == pytest.approx(0.0, abs=1e-7)
    assert float(out.loss.detach()) == pytest.approx(float(out.ce), abs=1e-6)   # the anchor adds nothing
    with torch.no_grad():
        model.decoder.head.weight.add_(0.5 * torch.randn_like(model.decoder.head.weight))
    moved = ace_loss(model, batch, omega=0.0, anchor=(teacher, rows, 1.0))
    assert float(moved.anchor) > 1e-3
    assert float(moved.loss.detach()) == pytest.approx(float(moved.ce) + float(moved.anchor), rel=1e-5)
    # rows not anchored contribute nothing; no anchored row: exactly 0
    none = ace_loss(model, batch, omega=0.0, anchor=(teacher, torch.zeros(8, dtype=torch.bool), 1.0))
    assert float(none.anchor) == 0.0
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
    half = torch.zeros(logits.shape[:2], dtype=torch.bool)
    half[:4] = True
    assert float(anchor_kl(logits, teacher, half)) != pytest.approx(float(anchor_kl(logits, teacher, ~half)))


def test_previous_model_is_a_frozen_copy(task):
    from ace.training.distill import PreviousModel

    model = make_model(task)
    previous = PreviousModel(model)
    batch = _batch(task)
    before = previous.logits(batch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(previous.logits(batch), before)   # later updates of the model do not reach the copy
    assert not any(p.requires_grad for p in previous.model.parameters()) and not previous.model.training


def test_training_with_the_anchor_logs_it_and_stays_closer_to_the_previous_model(task, tmp_path):
    from ace.training.distill import PreviousModel, anchor_kl

    batch = _batch(task)
    drift = {}
    for weight in (0.0, 5.0):
        model = make_model(task)
        previous = PreviousModel(model)
        anchored = [True] * len(task.pairs)
        res = train_retriever(model, task.qtok, task.idtok, task.vocab, task.pairs, None,
                              small_cfg(max_steps=12, lr=1e-2, omega=0.0), tmp_path / f"w{weight}", resume=False,
                              anchor=(previous, anchored, weight))
        log = [json.loads(line) for line in (tmp_path / f"w{weight}" / "train_log.jsonl").read_text().splitlines()]
        assert ("anchor" in log[-1]) == (weight > 0)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=batch["decoder_input_ids"]).logits
        drift[weight] = float(anchor_kl(logits, previous.logits(batch), torch.ones(logits.shape[:2], dtype=torch.bool)))
        assert res.step == 12
    assert drift[5.0] < drift[0.0]
