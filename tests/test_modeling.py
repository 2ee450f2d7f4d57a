import pytest
import torch

from ace.model.modeling import AceConfig, AceInputError, AceModel
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
