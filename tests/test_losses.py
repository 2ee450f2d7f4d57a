"""R-Drop KL and the ACE loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ace.model.config import AceConfig
from ace.model.modeling import AceModel
from ace.training.losses import IGNORE_INDEX, ace_loss, rdrop_kl, token_cross_entropy




def tiny_model(V=11, dropout=0.3):
    """A tiny AceModel: identifier vocab 3 specials + 4 + 4 tokens = 11, query vocab 11."""
    torch.manual_seed(0)
    return AceModel(AceConfig(d_model=16, n_heads=2, encoder_layers=2, decoder_layers=1, ffn_dim=32, dropout=dropout,
                              query_vocab_size=V, max_query_length=8, level_sizes=[4, 4, 4]))


def make_batch(B=4, S=5, T=3, V=11):
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([3 + 4 * i + torch.randint(0, 4, (B,), generator=g) for i in range(T)], 1)  # level tokens
    return {"input_ids": torch.randint(0, V, (B, S), generator=g), "attention_mask": torch.ones(B, S, dtype=torch.long),
            "decoder_input_ids": torch.cat([torch.ones(B, 1, dtype=torch.long), labels[:, :-1]], 1),
            "labels": labels}


def test_kl_zero_for_identical_passes():
    logits = torch.randn(3, 4, 7)
    assert rdrop_kl(logits, logits.clone(), torch.ones(3, 4, dtype=torch.bool)).item() == pytest.approx(0, abs=1e-7)


def test_kl_positive_symmetric_and_matches_definition():
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    kl = rdrop_kl(a, b, mask)
    assert kl.item() > 0
    assert kl.item() == pytest.approx(rdrop_kl(b, a, mask).item(), rel=1e-6)
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    ref = 0.5 * (F.kl_div(lb, la, log_target=True, reduction="none").sum(-1)
                 + F.kl_div(la, lb, log_target=True, reduction="none").sum(-1))
    assert kl.item() == pytest.approx(ref[mask].mean().item(), rel=1e-5)
    # masked positions do not count
    b2 = b.clone()
    b2[0, 2] += 100
    assert rdrop_kl(a, b2, mask).item() == pytest.approx(kl.item(), rel=1e-6)


def test_ace_loss_kl_zero_without_dropout_and_positive_with_it():
    torch.manual_seed(0)
    model, batch = tiny_model(), make_batch()
    model.eval()  # identical passes
    out = ace_loss(model, batch, omega=0.15)
    assert out.kl.item() == pytest.approx(0, abs=1e-7)
    assert out.loss.item() == pytest.approx(out.ce.item(), rel=1e-6)
    model.train()  # independent dropout masks
    out = ace_loss(model, batch, omega=0.15)
    assert out.kl.item() > 1e-4
    assert out.loss.item() == pytest.approx(out.ce.item() + 0.15 * out.kl.item(), rel=1e-5)
    out.loss.backward()
    assert model.decoder.head.weight.grad is not None and torch.isfinite(model.decoder.head.weight.grad).all()


def test_omega_zero_is_plain_cross_entropy_in_one_pass():
    torch.manual_seed(0)
    model, batch = tiny_model(), make_batch()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    torch.manual_seed(5)
    out = ace_loss(model, batch, omega=0.0)
    torch.manual_seed(5)  # same dropout mask
    ref = F.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.flatten(0, 1),
                          batch["labels"].flatten())
    assert len(calls) == 2  # one for ace_loss, one for the reference
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.kl.item() == 0


def test_ignore_index_positions_are_skipped():
    logits = torch.randn(2, 3, 6)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])
    ref = F.cross_entropy(logits[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    assert token_cross_entropy(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        rdrop_kl(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        rdrop_kl(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="selects no token"):
        rdrop_kl(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="omega"):
        ace_loss(tiny_model(), make_batch(), omega=-1)
    batch = make_batch()
    del batch["labels"]
    with pytest.raises(KeyError, match="labels"):
        ace_loss(tiny_model(), batch)
    with pytest.raises(ValueError, match="does not match"):
        token_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_frozen_encoder_runs_once_for_both_passes_with_the_same_logits():
    model, batch = tiny_model(), make_batch()
    model.freeze_encoder()
    calls = []
    model.encoder.register_forward_hook(lambda mod, inp, out: calls.append(out.layer_states.shape[0]))
    model.eval()  # no dropout: the shared forward must equal the batch stacked twice
    stacked = {k: v.repeat(2, 1) for k, v in batch.items() if k != "labels"}
    want = model(**stacked).logits
    got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"], num_passes=2).logits
    assert calls == [8, 4]  # the stacked forward encodes 2B rows, the shared one B rows
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model.train()  # the decoder's dropout still differs between the passes
    out = ace_loss(model, batch, omega=0.15)
    assert calls[-1] == 4 and out.kl.item() > 1e-4


def test_trained_encoder_gets_its_own_dropout_per_pass():
    model, batch = tiny_model(), make_batch()
    calls = []
    model.encoder.register_forward_hook(lambda mod, inp, out: calls.append(out.layer_states.shape[0]))
    ace_loss(model, batch, omega=0.15)
    assert calls == [8]


def test_precomputed_encoder_states_give_the_same_loss():
    model, batch = tiny_model(), make_batch()
    model.freeze_encoder()
    model.eval()
    with torch.no_grad():
        states = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).layer_states
    want = ace_loss(model, batch, omega=0.15)
    got = ace_loss(model, {**batch, "encoder_layer_states": states}, omega=0.15)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    with pytest.raises(Exception, match="num_passes"):
        model(**{k: v for k, v in batch.items()}, num_passes=0)
