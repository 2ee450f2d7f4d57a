import copy

import numpy as np
import pytest
import torch

from ace.model.decoding import (DecodingError, _allowed_children, _trie_tensors, constrained_beam_search,
                          quantize_dynamic_int8, search_batches, unconstrained_beam_search)
from ace.model.config import AceConfig
from ace.model.modeling import AceInputError, AceModel
from ace.model.tokens import BOS, IdentifierVocab
from identifiers.trie import FlatTrie

SIZES = [6, 5, 4, 3]




@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = AceModel(AceConfig(d_model=32, n_heads=2, encoder_layers=3, decoder_layers=2, ffn_dim=64,
                               query_vocab_size=50, max_query_length=8, level_sizes=SIZES)).eval()
    rng = np.random.default_rng(0)
    codes = np.unique(np.stack([rng.integers(0, s, 200) for s in SIZES], 1), axis=0)
    trie = FlatTrie.from_codes(codes, SIZES)
    ids = torch.randint(3, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    ids = ids * mask
    return model, trie, codes, IdentifierVocab(SIZES), ids, mask


def sequence_logprob(model, vocab, ids, mask, codes):
    """Teacher-forced log-probability of identifiers codes (B, K, L) for each query."""
    B, K, L = codes.shape
    tokens = torch.as_tensor(vocab.encode(codes.reshape(B * K, L)))
    dec = torch.cat([torch.full((B * K, 1), BOS), tokens[:, :-1]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids.repeat_interleave(K, 0), attention_mask=mask.repeat_interleave(K, 0),
                       decoder_input_ids=dec).logits
    lp = torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0].sum(1)
    return lp.view(B, K)


def test_constrained_search_returns_distinct_valid_items_with_true_scores(setup):
    model, trie, codes, vocab, ids, mask = setup
    items, lp = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=5, top_k=4)
    assert items.shape == lp.shape == (4, 4) and items.dtype == torch.int64
    assert ((items >= 0) & (items < len(codes))).all()
    for row in items:
        assert len(set(row.tolist())) == 4
    assert (lp[:, :-1] >= lp[:, 1:]).all()                        # ranked by sequence log-prob
    torch.testing.assert_close(lp, sequence_logprob(model, vocab, ids, mask, codes[items.numpy()]),
                               atol=1e-4, rtol=1e-4)


def test_exhaustive_beams_equal_brute_force_ranking(setup):
    model, _, codes, vocab, ids, mask = setup
    small = codes[::25]                                              # 8 identifiers
    trie = FlatTrie.from_codes(small, SIZES)
    items, lp = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=len(small))
    all_lp = sequence_logprob(model, vocab, ids, mask, np.broadcast_to(small, (4,) + small.shape))
    expect_lp, expect_items = all_lp.sort(dim=1, descending=True)
    assert torch.equal(items, expect_items)
    torch.testing.assert_close(lp, expect_lp, atol=1e-4, rtol=1e-4)


def test_fewer_items_than_beams_pads_with_minus_one(setup):
    model, _, codes, vocab, ids, mask = setup
    trie = FlatTrie.from_codes(codes[:2], SIZES, items=np.array([7, 9]))
    items, lp = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=5)
    assert items.shape == (4, 5)
    assert (np.sort(items[:, :2].numpy(), 1) == [7, 9]).all()
    assert (items[:, 2:] == -1).all() and torch.isinf(lp[:, 2:]).all() and torch.isfinite(lp[:, :2]).all()


def test_equals_transformers_generate_with_prefix_allowed_tokens_fn(setup):
    model, trie, codes, vocab, ids, mask = setup

    def allowed(batch_id, prefix_tokens):
        prefix = (prefix_tokens[1:].numpy() - np.asarray(vocab.offsets[:len(prefix_tokens) - 1])).tolist()
        return (trie.allowed_next(prefix) + vocab.offsets[len(prefix)]).tolist()

    for beams in (3, 5):
        items, lp = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=beams)
        out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams,
                             max_new_tokens=len(SIZES), prefix_allowed_tokens_fn=allowed, length_penalty=0.0,
                             do_sample=False, early_stopping=False, use_cache=False, return_dict_in_generate=True,
                             output_scores=True, decoder_start_token_id=BOS, bos_token_id=BOS, eos_token_id=2,
                             pad_token_id=0)
        hf_items = trie.lookup_rows(vocab.decode(out.sequences[:, 1:].numpy())).reshape(len(ids), beams)
        assert (hf_items >= 0).all()
        np.testing.assert_array_equal(items.numpy(), hf_items)
        torch.testing.assert_close(lp, out.sequences_scores.view(len(ids), beams), atol=1e-4, rtol=1e-4)


def test_mask_building_matches_trie_children(setup):
    _, trie, _, _, _, _ = setup
    tt = _trie_tensors(trie, torch.device("cpu"))
    depth1 = trie.child_node[:trie.child_count[0]]                   # the root's children
    for level, nodes in ((0, torch.tensor([0, -1])), (1, torch.tensor([int(depth1[0]), -1, int(depth1[-1])]))):
        allowed, child = _allowed_children(nodes, tt, SIZES[level])
        assert allowed.shape == child.shape == (len(nodes), SIZES[level])
        for r, node in enumerate(nodes.tolist()):
            if node < 0:                                              # dead beam: nothing allowed
                assert torch.isinf(allowed[r]).all() and (child[r] == -1).all()
                continue
            codes, kids = trie.children(node)
            assert torch.isfinite(allowed[r]).nonzero()[:, 0].tolist() == codes.tolist()
            assert child[r, torch.as_tensor(codes)].tolist() == kids.tolist()


def test_unconstrained_ablation_drops_and_counts_invalid(setup):
    model, trie, codes, vocab, ids, mask = setup
    items, lp, num_invalid = unconstrained_beam_search(model, ids, mask, trie, vocab, num_beams=5)
    assert items.shape == (4, 5)
    assert num_invalid == int((items < 0).sum())
    valid = items >= 0
    for row, ok in zip(items, valid):                                 # valid ones first, all distinct
        k = int(ok.sum())
        assert ok[:k].all() and len(set(row[:k].tolist())) == k
    # after a little training on the trie's identifiers, beams are mostly well-formed: valid ones are
    # returned with their true scores, the rest counted
    trained = copy.deepcopy(model).train()
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    targets = torch.as_tensor(vocab.encode(codes[:4]))
    for _ in range(40):
        loss = trained(input_ids=ids, attention_mask=mask, labels=targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    items, lp, num_invalid = unconstrained_beam_search(trained, ids, mask, trie, vocab, num_beams=5)
    valid = items >= 0
    assert num_invalid == int((~valid).sum()) < items.numel()
    assert (items[:, 0] == torch.arange(4)).all()                     # the learned targets come first
    got = sequence_logprob(trained, vocab, ids, mask, codes[items.clamp_min(0).numpy()])
    torch.testing.assert_close(lp[valid], got[valid], atol=1e-4, rtol=1e-4)


def test_int8_dynamic_quantised_model_decodes_valid_items(setup):
    model, trie, codes, vocab, ids, mask = setup
    q = quantize_dynamic_int8(model)
    assert "DynamicQuantizedLinear" in repr(q.decoder.head)
    items, lp = constrained_beam_search(q, ids, mask, trie, vocab, num_beams=5)
    ref, _ = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=5)
    assert ((items >= 0) & (items < len(codes))).all()
    assert (items[:, 0] == ref[:, 0]).float().mean() >= 0.5          # int8 mostly keeps the top item


def test_bad_arguments_give_clear_errors(setup):
    model, trie, codes, vocab, ids, mask = setup
    with pytest.raises(DecodingError, match="top_k=6 must be in"):
        constrained_beam_search(model, ids, mask, trie, vocab, num_beams=5, top_k=6)
    with pytest.raises(DecodingError, match="input_ids must be a torch tensor"):
        constrained_beam_search(model, ids.tolist(), mask, trie, vocab)
    with pytest.raises(DecodingError, match="num_beams must be >= 1"):
        constrained_beam_search(model, ids, mask, trie, vocab, num_beams=0)
    with pytest.raises(DecodingError, match="trie level_sizes"):
        constrained_beam_search(model, ids, mask, FlatTrie.from_codes(np.unique(codes[:, :3], axis=0), SIZES[:3]), vocab)
    with pytest.raises(DecodingError, match="model level_sizes"):
        constrained_beam_search(model, ids, mask, trie, IdentifierVocab([6, 5, 4, 4]))
    with pytest.raises(AceInputError, match="empty query"):
        constrained_beam_search(model, ids, torch.zeros_like(mask), trie, vocab)
    with pytest.raises(AceInputError, match="exceeds max_query_length"):
        constrained_beam_search(model, torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.long),
                                trie, vocab)


def test_search_runs_in_eval_mode_and_restores_training_mode(setup):
    model, trie, codes, vocab, ids, mask = setup
    ref = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=5)
    model.train()
    try:
        got = constrained_beam_search(model, ids, mask, trie, vocab, num_beams=5)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_a_forest_decodes_each_query_in_its_own_trie_as_separate_calls_would(setup):
    model, _, codes, vocab, ids, mask = setup
    rows = np.arange(len(codes))
    parts = [FlatTrie.from_codes(codes[rows % 3 == r], SIZES, items=rows[rows % 3 == r]) for r in range(3)]
    forest, roots = FlatTrie.forest(parts)
    assert forest.num_items == len(codes) and roots[0] == 0
    pick = [2, 0, 1, 2]  # query i searches parts[pick[i]]
    items, lp = constrained_beam_search(model, ids, mask, forest, vocab, num_beams=6, top_k=5, roots=roots[pick])
    for i, p in enumerate(pick):
        alone, alone_lp = constrained_beam_search(model, ids[i:i + 1], mask[i:i + 1], parts[p], vocab, num_beams=6, top_k=5)
        assert items[i].tolist() == alone[0].tolist()
        torch.testing.assert_close(lp[i], alone_lp[0], atol=1e-5, rtol=1e-5)
        assert all(int(x) % 3 == p for x in items[i] if x >= 0)
    with pytest.raises(DecodingError, match="roots"):
        constrained_beam_search(model, ids, mask, forest, vocab, num_beams=6, top_k=5, roots=[0, 1])


def test_per_query_beam_widths_and_top_k_in_one_call_give_the_results_of_separate_calls(setup):
    """A mixed micro-batch (k=20 beside k<=10) decodes in one call; each query keeps its own beam width."""
    model, trie, codes, vocab, ids, mask = setup
    widths, ks = [3, 8, 3, 5], [2, 8, 3, 1]
    rows = np.arange(len(codes))
    parts = [FlatTrie.from_codes(codes[rows % 2 == r], SIZES, items=rows[rows % 2 == r]) for r in range(2)]
    forest, roots = FlatTrie.forest(parts)
    pick = [1, 0, 0, 1]
    items, lp = constrained_beam_search(model, ids, mask, forest, vocab, num_beams=widths, top_k=ks, roots=roots[pick])
    assert items.shape == lp.shape == (4, max(ks))
    for i, (w, k, p) in enumerate(zip(widths, ks, pick)):
        alone, alone_lp = constrained_beam_search(model, ids[i:i + 1], mask[i:i + 1], parts[p], vocab, num_beams=w, top_k=k)
        assert items[i, :k].tolist() == alone[0].tolist() and (items[i, k:] == -1).all()
        torch.testing.assert_close(lp[i, :k], alone_lp[0], atol=1e-5, rtol=1e-5)
    got, got_lp, _ = search_batches(model, ids, mask, forest, vocab, num_beams=widths, top_k=ks, batch_size=3,
                                    roots=roots[pick])  # batches of 3 and 1, padded to the largest top_k
    assert got.tolist() == items.tolist()
    with pytest.raises(DecodingError, match="top_k=4 must be in"):
        constrained_beam_search(model, ids, mask, trie, vocab, num_beams=[3, 3, 3, 3], top_k=[1, 2, 3, 4])
    with pytest.raises(DecodingError, match="one value or one per query"):
        constrained_beam_search(model, ids, mask, trie, vocab, num_beams=[3, 4])
