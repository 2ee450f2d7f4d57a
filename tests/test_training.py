"""Training loop: LR schedule, checkpoints, exact resume after a kill, bad inputs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ace.model.config import AceConfig
from ace.model.modeling import AceModel
from ace.training import loop as training
from ace.model.tokens import IdentifierVocab, QueryTokenizer
from ace.training.evaluate import evaluate_retriever
from ace.training.loop import (TrainConfig, TrainingDataError, encode_pairs, latest_checkpoint, train_retriever,
                               warmup_cosine)
from identifiers.trie import IdentifierTrie

LEVELS = [4, 3, 5]  # K, C_1, U




@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    n = 12
    codes = np.stack([rng.integers(0, s, n) for s in LEVELS], 1)
    codes[:, -1] = np.arange(n) % LEVELS[-1]
    item_ids = [f"item{i}" for i in range(n)]
    colours = ["red", "blue", "green", "black", "white", "pink"]
    pairs = [(f"a {colours[i % 6]} thing number {i} photo {j}", i) for i in range(n) for j in range(3)]
    qtok = QueryTokenizer.train([q for q, _ in pairs], vocab_size=40, max_length=16)
    trie = IdentifierTrie.from_codes(codes, item_ids, LEVELS)
    idtok = SimpleNamespace(codes=codes, item_ids=item_ids, level_sizes=LEVELS, trie=trie)
    return SimpleNamespace(idtok=idtok, vocab=IdentifierVocab(LEVELS),
                           qtok=qtok, pairs=pairs)


def make_model(task, seed=0):
    torch.manual_seed(seed)
    return AceModel(AceConfig(d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=32, dropout=0.1,
                              query_vocab_size=task.qtok.vocab_size, max_query_length=16, level_sizes=LEVELS))


def small_cfg(**kw):
    base = dict(lr=3e-3, warmup_steps=2, batch_size=8, max_steps=8, checkpoint_every=4, log_every=1, eval_every=0,
                progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=100, min_lr_ratio=0.1) for s in range(100)]
    assert np.allclose(lrs[:10], np.arange(1, 11) / 10)  # linear ramp to the peak
    assert lrs[9] == pytest.approx(1.0)
    tail = np.asarray(lrs[10:])
    assert np.all(np.diff(tail) < 0)  # strictly decaying after warmup
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert warmup_cosine(100, warmup_steps=10, total_steps=100, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_logged_lr_follows_schedule(task, tmp_path):
    cfg = small_cfg(max_steps=6, warmup_steps=2)
    res = train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path)
    lrs = [r["lr"] for r in res.history if "lr" in r]
    want = [cfg.lr * warmup_cosine(s, warmup_steps=2, total_steps=6) for s in range(1, 7)]
    assert np.allclose(lrs, want)


def test_checkpoints_written_and_rotated(task, tmp_path):
    cfg = small_cfg(max_steps=8, checkpoint_every=2, keep_checkpoints=2)
    model = make_model(task)
    res = train_retriever(model, task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path)
    assert res.step == 8
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-6", "step-8"]
    files = {p.name for p in (tmp_path / "checkpoints" / "step-8").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= files
    state = json.loads((tmp_path / "checkpoints" / "step-8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["total_steps"] == 8
    assert (tmp_path / "model" / "model.safetensors").is_file()
    reloaded = AceModel.from_pretrained(tmp_path / "model").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded[name]), name
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert log[-1]["loss"] < log[0]["loss"]


def test_resume_after_kill_matches_uninterrupted_run(task, tmp_path):
    cfg = small_cfg(max_steps=8, checkpoint_every=4, omega=0.15)  # dropout + R-Drop: RNG state matters
    full = make_model(task)
    ref = train_retriever(full, task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path / "full")

    killed = make_model(task)
    part = train_retriever(killed, task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path / "resumed",
                           stop_at=4)
    assert part.step == 4 and latest_checkpoint(tmp_path / "resumed").name == "step-4"
    assert not (tmp_path / "resumed" / "model").exists()
    fresh = make_model(task, seed=123)  # a new process: different init, state comes from the checkpoint
    res = train_retriever(fresh, task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path / "resumed",
                          resume=True)
    assert res.step == 8
    losses_ref = [r["loss"] for r in ref.history]
    losses_res = [r["loss"] for r in res.history]
    assert [r["step"] for r in res.history] == list(range(1, 9))
    assert losses_res == pytest.approx(losses_ref, rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_false_starts_over(task, tmp_path):
    cfg = small_cfg(max_steps=4)
    train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path, stop_at=2)
    res = train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, cfg, tmp_path,
                          resume=False)
    assert [r["step"] for r in res.history] == [1, 2, 3, 4]


def test_resume_with_changed_trajectory_is_refused(task, tmp_path):
    train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, small_cfg(), tmp_path,
                    stop_at=4)
    with pytest.raises(ValueError, match="lr"):
        train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None,
                        small_cfg(lr=1e-2), tmp_path)


def test_encode_pairs_builds_shifted_targets(task):
    data = encode_pairs([("a red thing", 2), ("a blue thing", "item5")], task.qtok, task.idtok, task.vocab,
                        max_query_length=16)
    want = task.vocab.encode(task.idtok.codes[[2, 5]])
    assert data.labels.tolist() == want.tolist()
    assert data.decoder_input_ids[:, 0].tolist() == [1, 1]  # BOS
    assert data.decoder_input_ids[:, 1:].tolist() == want[:, :-1].tolist()
    assert data.rows.tolist() == [2, 5]


@pytest.mark.parametrize("pairs, message", [
    ([], "train_pairs is empty"),
    ([("a red thing", 12)], "out of range"),
    ([("a red thing", -1)], "out of range"),
    ([("a red thing", "nope")], "unknown item id 'nope'"),
    ([("   ", 0)], "non-empty string"),
    ([("a red thing",)], r"\(query, item\) pair"),
    ([("a red thing", 1.5)], "row index"),
])
def test_bad_training_pairs(task, tmp_path, pairs, message):
    with pytest.raises(TrainingDataError, match=message):
        train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, pairs, None, small_cfg(), tmp_path)


@pytest.mark.parametrize("kw, message", [
    (dict(lr=0), "lr"), (dict(optimizer="sgd"), "optimizer"), (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(batch_size=0), "batch_size"), (dict(best_metric="acc"), "best_metric"), (dict(max_steps=0), "max_steps"),
    (dict(num_beams=2, eval_top_k=5), "eval_top_k"),
])
def test_bad_train_config(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_query_length_beyond_model_is_refused(task, tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's max_query_length=16"):
        train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None,
                        small_cfg(max_query_length=64), tmp_path)


def test_periodic_eval_with_constrained_search(task, tmp_path):
    cfg = small_cfg(max_steps=8, eval_every=4, num_beams=3, eval_top_k=3)
    model = make_model(task)
    res = train_retriever(model, task.qtok, task.idtok, task.vocab, task.pairs, task.pairs[::3], cfg, tmp_path)
    evals = [r for r in res.history if "eval" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval"]["queries"] == len(task.pairs[::3])
    assert set(evals[-1]["eval"]) >= {"R@1", "R@5", "R@10", "MRR@10"}
    assert res.best_step in (4, 8)
    assert res.best_metrics == evals[[4, 8].index(res.best_step)]["eval"]
    # evaluate_retriever (what the pipeline and benchmarks call) agrees with the in-loop eval of the exported model
    if res.best_step == 8:
        again = evaluate_retriever(model, task.qtok, task.idtok, task.vocab, task.pairs[::3], num_beams=3, top_k=3)
        assert again["R@1"] == pytest.approx(evals[-1]["eval"]["R@1"])


def test_best_checkpoint_is_kept_and_exported(task, tmp_path, monkeypatch):
    """A fake ranker scores step 4 perfectly and step 8 badly: step-4 survives rotation and becomes the model."""
    val = task.pairs[::3]
    rows = np.asarray([i for _, i in val])
    calls = []

    def fake_rank_items(model, input_ids, attention_mask, trie, vocab, *, num_beams, top_k, batch_size, progress):
        calls.append(1)
        guess = rows if len(calls) == 1 else (rows + 1) % len(task.idtok.item_ids)
        return np.pad(guess[:, None], ((0, 0), (0, top_k - 1)), constant_values=-1)

    monkeypatch.setattr(training, "rank_items", fake_rank_items)
    cfg = small_cfg(max_steps=8, eval_every=4, checkpoint_every=2, keep_checkpoints=1, num_beams=2, eval_top_k=2)
    model = make_model(task)
    res = train_retriever(model, task.qtok, task.idtok, task.vocab, task.pairs, val, cfg, tmp_path)
    assert res.best_step == 4 and res.best_metrics["R@1"] == 100.0 and res.final_metrics["R@1"] == 0.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-8"]
    exported = json.loads((tmp_path / "model" / "training_state.json").read_text())
    assert exported["exported_step"] == 4
    from safetensors.torch import load_file

    step4 = load_file(tmp_path / "checkpoints" / "step-4" / "model.safetensors")
    saved = AceModel.from_pretrained(tmp_path / "model").state_dict()
    for name, value in step4.items():
        assert torch.equal(value, saved[name]), name


def test_resume_with_other_training_data_is_refused(task, tmp_path):
    train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None, small_cfg(), tmp_path,
                    stop_at=4)
    with pytest.raises(ValueError, match="pairs"):
        train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs[:-1], None, small_cfg(),
                        tmp_path)


def test_train_config_from_yaml_overrides(tmp_path):
    from ace.config import ConfigError, load_config

    path = tmp_path / "train.yaml"
    path.write_text("lr: 3.0e-4\nomega: 0\n")
    cfg = load_config(TrainConfig, path, ["max_steps=10", "mixed_precision=bf16"])
    assert (cfg.lr, cfg.omega, cfg.max_steps, cfg.mixed_precision) == (3e-4, 0.0, 10, "bf16")
    with pytest.raises(ConfigError, match="warmup"):
        load_config(TrainConfig, None, ["warmup=5"])


def test_frozen_encoder_outputs_are_cached_and_training_matches_the_uncached_run(task, tmp_path):
    from ace.training.loop import cache_encoder_states

    model = make_model(task)
    model.freeze_encoder()
    enc = encode_pairs(task.pairs, task.qtok, task.idtok, task.vocab, max_query_length=16)
    states = cache_encoder_states(model.encoder, enc, budget_gb=1.0, batch_size=5)
    width = int(enc.attention_mask.sum(1).max())
    assert states.shape == (len(task.pairs), 1, width, 16)
    for i in (0, 7, len(task.pairs) - 1):  # each query's real positions equal a fresh encoder forward
        n = int(enc.attention_mask[i].sum())
        with torch.no_grad():
            ref = model.encoder(input_ids=enc.input_ids[i:i + 1, :n], attention_mask=enc.attention_mask[i:i + 1, :n])
        torch.testing.assert_close(states[i, :, :n], ref.layer_states[0], rtol=1e-4, atol=1e-5)
    assert cache_encoder_states(model.encoder, enc, budget_gb=1e-9) is None  # over budget: no cache

    runs = {}
    for gb in (1.0, 0.0):  # cached vs encoding every batch: the same trajectory
        res = train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None,
                              small_cfg(freeze_encoder=True, encoder_cache_gb=gb, max_steps=6), tmp_path / str(gb))
        runs[gb] = [r["loss"] for r in res.history if "loss" in r]
    assert len(runs[1.0]) == 6
    assert np.allclose(runs[1.0], runs[0.0], rtol=1e-4)


def test_query_token_dropout_hides_tokens_but_never_the_first_or_padding():
    from ace.training.loop import query_token_dropout

    torch.manual_seed(0)
    mask = torch.ones(200, 30, dtype=torch.long)
    mask[:, 20:] = 0  # padding
    out = query_token_dropout(mask, 0.25)
    assert out.dtype == mask.dtype and (out[:, 0] == 1).all() and (out[:, 20:] == 0).all()
    hidden = 1 - out[:, 1:20].float().mean().item()
    assert 0.2 < hidden < 0.3
    assert torch.equal(query_token_dropout(mask, 0.0), mask)


def test_training_with_query_token_dropout_changes_the_run(task, tmp_path):
    losses = {}
    for p in (0.0, 0.3):
        res = train_retriever(make_model(task), task.qtok, task.idtok, task.vocab, task.pairs, None,
                              small_cfg(query_token_dropout=p, max_steps=4), tmp_path / str(p))
        losses[p] = [r["loss"] for r in res.history if "loss" in r]
    assert len(losses[0.3]) == 4 and not np.allclose(losses[0.0], losses[0.3])
    with pytest.raises(ValueError, match="query_token_dropout"):
        TrainConfig(query_token_dropout=1.0)
