import numpy as np
import pytest
import torch

from ace.model.config import AceConfig
from ace.model.modeling import AceInputError, AceModel
from ace.model.tokens import BOS

SIZES = [6, 5, 4, 3]




def tiny(**kw) -> AceModel:
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_heads=2, encoder_layers=3, decoder_layers=2, ffn_dim=64, query_vocab_size=50,
               max_query_length=8, level_sizes=SIZES)
    cfg.update(kw)
    return AceModel(AceConfig(**cfg)).eval()


def batch():
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids > 0).long()
    labels = torch.tensor([[3, 9, 14, 18], [8, 11, 17, 20]])   # offsets 3, 9, 14, 18
    dec = torch.cat([torch.full((2, 1), BOS), labels[:, :-1]], 1)
    return ids, mask, dec, labels


def test_forward_shapes_loss_and_default_size():
    model = tiny()
    ids, mask, dec, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    assert out.logits.shape == (2, 4, 3 + sum(SIZES))
    expect = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expect)
    out2 = model(input_ids=ids, attention_mask=mask, labels=labels)        # decoder input built from labels
    torch.testing.assert_close(out2.logits, out.logits)
    d = AceConfig()
    assert (d.d_model, d.n_heads, d.encoder_layers, d.decoder_layers, d.dropout, d.fusion) == (256, 4, 3, 3, 0.1, True)


def test_decoder_is_causal_and_cached_steps_match_full_forward():
    model = tiny()
    ids, mask, dec, _ = batch()
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    dec2 = dec.clone()
    dec2[:, 2:] = 4
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec2).logits[:, :2],
                               full[:, :2])
    with torch.no_grad():
        memory = model.decoder.memory(model.encode(ids, mask))
        cache = []
        for t in range(4):
            logits, cache = model.decoder.step(dec[:, t:t + 1], t, memory, mask.bool()[:, None, None, :], cache)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_training_step_reduces_loss_and_dropout_is_active():
    model = tiny(dropout=0.1).train()
    ids, mask, dec, labels = batch()
    a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    b = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert not torch.allclose(a, b)                                          # R-Drop needs this
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_xavier_init():
    model = tiny()
    w = model.decoder.layers[0].cross.fine.gate_c[0].weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert model.decoder.head.bias.abs().max() == 0


@pytest.mark.parametrize("fusion", [True, False])
def test_save_pretrained_round_trip_identical(tmp_path, fusion):
    model = tiny(fusion=fusion)
    ids, mask, dec, _ = batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = AceModel.from_pretrained(tmp_path).eval()
    assert again.config.fusion is fusion and again.config.level_sizes == SIZES
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=0, rtol=0)


def test_bad_inputs_give_clear_errors():
    model = tiny()
    ids, mask, dec, labels = batch()
    with pytest.raises(AceInputError, match="2-D"):
        model(input_ids=ids[0], attention_mask=mask[0], decoder_input_ids=dec)
    with pytest.raises(AceInputError, match="empty query"):
        model(input_ids=ids, attention_mask=torch.zeros_like(mask), decoder_input_ids=dec)
    with pytest.raises(AceInputError, match="empty query batch"):
        model(input_ids=ids[:, :0], attention_mask=mask[:, :0], decoder_input_ids=dec)
    with pytest.raises(AceInputError, match="exceeds max_query_length=8"):
        long = torch.ones(2, 9, dtype=torch.long)
        model(input_ids=long, attention_mask=long, decoder_input_ids=dec)
    with pytest.raises(AceInputError, match="attention_mask shape"):
        model(input_ids=ids, attention_mask=mask[:, :3], decoder_input_ids=dec)
    with pytest.raises(AceInputError, match=r"query token ids must be in \[0, 50\)"):
        model(input_ids=ids + 100, attention_mask=mask, decoder_input_ids=dec)
    with pytest.raises(AceInputError, match="identifier length"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(AceInputError, match="identifier token ids"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec + 100)
    with pytest.raises(AceInputError, match="labels shape"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels[:, :2])
    with pytest.raises(AceInputError, match="integer token ids"):
        model(input_ids=ids.float(), attention_mask=mask, decoder_input_ids=dec)
    with pytest.raises(ValueError, match="divisible"):
        AceConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="level_sizes must be positive"):
        AceConfig(level_sizes=[4, 0])


def test_identifier_embedding_init_from_centroids():
    model = tiny()
    rng = torch.Generator().manual_seed(0)
    centroids = torch.randn(SIZES[0], 8, generator=rng)
    before = model.decoder.embed.weight.detach().clone()
    model.init_identifier_embeddings([centroids.numpy(), None])
    after = model.decoder.embed.weight.detach()
    assert not torch.equal(after[3:9], before[3:9]) and torch.equal(after[9:], before[9:])
    # nearby centroids give nearby token embeddings (a linear projection keeps the geometry)
    pair = torch.stack([centroids[0], centroids[0] + 1e-3])
    model.init_identifier_embeddings([torch.cat([pair, centroids[2:]]).numpy()])
    e = model.decoder.embed.weight
    assert (e[3] - e[4]).norm() < 0.05 * (e[3] - e[5]).norm()
    with pytest.raises(ValueError, match=r"level 0 vectors must have shape \(6, D\)"):
        model.init_identifier_embeddings([centroids[:3].numpy()])
    with pytest.raises(ValueError, match="NaN"):
        model.init_identifier_embeddings([torch.full((6, 8), float("nan")).numpy()])


def test_pretrained_minilm_encoder_fuses_its_last_layers(tmp_path):
    from transformers import AutoModel

    from ace.data.encoders import minilm_path
    from ace.model.tokens import QueryTokenizer
    path = minilm_path()
    with pytest.raises(ValueError, match="set d_model=384"):
        AceConfig(pretrained_encoder=path, d_model=256)
    model = AceModel(AceConfig(pretrained_encoder=path, d_model=384, n_heads=4, decoder_layers=1, ffn_dim=64,
                               level_sizes=SIZES)).eval()
    assert model.config.query_vocab_size == 30522
    tok = QueryTokenizer.from_pretrained(path, max_length=model.config.max_query_length)
    ids, mask = tok(["a dog on the beach", "red car"])
    bert = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        layers = model.encode(ids, mask)
    assert layers.shape == (2, 3, ids.shape[1], 384)
    torch.testing.assert_close(layers, torch.stack(hidden[-3:], 1))     # pretrained weights, last S=3 layers
    dec = torch.tensor([[BOS, 3, 9, 14], [BOS, 4, 10, 15]])
    model.save_pretrained(tmp_path)
    again = AceModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   atol=0, rtol=0)


def test_pretrained_encoder_truncated_to_its_first_layers(tmp_path):
    from transformers import AutoModel

    from ace.data.encoders import minilm_path
    from ace.model.tokens import QueryTokenizer
    path = minilm_path()
    with pytest.raises(ValueError, match="must be in \\[1, 6\\]"):
        AceConfig(pretrained_encoder=path, d_model=384, pretrained_encoder_layers=7)
    with pytest.raises(ValueError, match="needs a pretrained_encoder"):
        AceConfig(pretrained_encoder_layers=3)
    model = AceModel(AceConfig(pretrained_encoder=path, pretrained_encoder_layers=3, d_model=384, n_heads=4,
                               decoder_layers=1, ffn_dim=64, level_sizes=SIZES)).eval()
    assert len(model.encoder.bert.encoder.layer) == 3
    tok = QueryTokenizer.from_pretrained(path, max_length=model.config.max_query_length)
    ids, mask = tok(["a dog on the beach", "red car"])
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask,
                                                         output_hidden_states=True).hidden_states
        layers = model.encode(ids, mask)
    torch.testing.assert_close(layers, torch.stack(hidden[1:4], 1))  # BERT layers 1-3 = the S=3 fused ones
    model.save_pretrained(tmp_path)
    again = AceModel.from_pretrained(tmp_path).eval()
    assert len(again.encoder.bert.encoder.layer) == 3
    with torch.no_grad():
        torch.testing.assert_close(again.encode(ids, mask), layers, atol=0, rtol=0)


# ---------------------------------------------------------------- prototype-aware heads (issue 19, lever 3)

def _prototype_model(levels: int = 2):
    import numpy as np

    model = tiny(prototype_levels=levels, prototype_dim=32)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 32)).astype(np.float32)
    codes = np.stack([rng.integers(0, s, 40) for s in SIZES], 1)
    model.init_prototype_heads(codes, vectors)
    return model.eval(), codes, vectors


def test_prototype_heads_at_init_rank_like_dense_prototype_search():
    from ace.model.modeling import pooled_query, prefix_prototypes

    model, codes, vectors = _prototype_model()
    ids, mask, dec, _ = batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        q = torch.nn.functional.normalize(pooled_query(model.encode(ids, mask), mask), dim=-1)
    level0, level1 = prefix_prototypes(codes, vectors, SIZES, 2)
    # the level-0 prototypes are the unit means of the items' vectors under each k, computed by hand
    k0 = codes[:, 0] == 0
    by_hand = vectors[k0] / np.linalg.norm(vectors[k0], axis=1, keepdims=True)
    by_hand = by_hand.sum(0) / np.linalg.norm(by_hand.sum(0))
    np.testing.assert_allclose(level0[0], by_hand, atol=1e-5)
    dense0 = q @ torch.from_numpy(level0).T                                      # (B, K)
    lo0 = 3
    got0 = logits[:, 0, lo0:lo0 + SIZES[0]]
    assert torch.equal(got0.argsort(dim=1, descending=True), dense0.argsort(dim=1, descending=True))
    torch.testing.assert_close(got0, 20.0 * dense0, atol=1e-4, rtol=1e-4)
    # level 1 given the teacher-forced k: the dense ranking of the (k, v1) prototypes
    lo1 = lo0 + SIZES[0]
    for b in range(2):
        k = int(dec[b, 1]) - lo0
        dense1 = q[b] @ torch.from_numpy(level1[k * SIZES[1]:(k + 1) * SIZES[1]]).T
        torch.testing.assert_close(logits[b, 1, lo1:lo1 + SIZES[1]], 20.0 * dense1, atol=1e-4, rtol=1e-4)
    # deeper levels are the plain head: not zero
    assert logits[:, 2].abs().sum() > 0


def test_prototype_heads_cached_steps_match_forward_and_need_a_query():
    model, _, _ = _prototype_model()
    ids, mask, dec, labels = batch()
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    with torch.no_grad():
        layers = model.encode(ids, mask)
        memory, query = model.decoder.memory(layers), model.prototype_query(layers, mask)
        cache = []
        for t in range(4):
            logits, cache = model.decoder.step(dec[:, t:t + 1], t, memory, mask.bool()[:, None, None, :], cache,
                                               query=query)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        with pytest.raises(AceInputError, match="prototype heads"):
            model.decoder.step(dec[:, :1], 0, memory, mask.bool()[:, None, None, :], [])
    # R-Drop's stacked passes and a backward step reach P and s
    model.train()
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, num_passes=2)
    assert out.logits.shape[0] == 4
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.repeat(2, 1).flatten()).backward()
    head = model.decoder.prototypes
    assert head.proj.weight.grad.abs().sum() > 0 and head.log_scale.grad.abs().sum() > 0


def test_prototype_heads_save_load_and_bad_input(tmp_path):
    model, codes, vectors = _prototype_model(levels=1)
    model.save_pretrained(tmp_path / "m")
    again = AceModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(again.decoder.prototypes.level0, model.decoder.prototypes.level0)
    assert again.decoder.prototypes.level1.shape[0] == 0          # one level: no (k, v1) table
    with pytest.raises(ValueError, match="prototype_dim"):
        model.init_prototype_heads(codes, vectors[:, :8])
    bad = vectors.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.init_prototype_heads(codes, bad)
    with pytest.raises(ValueError, match="prototype_levels"):
        AceConfig(level_sizes=SIZES, prototype_levels=3, prototype_dim=4)
    with pytest.raises(ValueError, match="no prototype heads"):
        tiny().init_prototype_heads(codes, vectors)
