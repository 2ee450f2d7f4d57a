"""The hybrid scorer (ace/newitems/hybrid.py): fusion, item-vector storage, query vectors from the model's own
encoder pass, teacher-forced identifier scores that match the beam search, and its bad-input errors."""
import copy
import json

import numpy as np
import pytest
import torch

from ace.newitems.candidates import DensePool
from ace.newitems.hybrid import (HybridConfig, HybridError, HybridScorer, ItemVectorSet, encode_texts, fit_weight, fuse, item_texts,
                        mean_vectors, rerank)


def test_fused_scores_equal_a_hand_computed_fusion():
    items = np.array([[3, 7, 5, -1]])
    lp = np.array([[-0.5, -1.0, -2.0, -np.inf]])
    cos = np.array([[0.2, 0.6, 0.9, 0.0]])
    # by hand, w = 2: 3 -> -0.5 + 0.4 = -0.1; 7 -> -1.0 + 1.2 = 0.2; 5 -> -2.0 + 1.8 = -0.2
    ranked, score = rerank(items, lp, cos, 2.0)
    assert ranked.tolist() == [[7, 3, 5, -1]]
    np.testing.assert_allclose(score[0, :3], [0.2, -0.1, -0.2])
    assert score[0, 3] == -np.inf
    # w = 0: the generative order; the padded slot stays last (no 0 * -inf NaN)
    assert rerank(items, lp, cos, 0.0)[0].tolist() == [[3, 7, 5, -1]]
    np.testing.assert_allclose(fuse(lp[:, :3], cos[:, :3], 0.5), [[-0.4, -0.7, -1.55]])


def test_fit_weight_picks_the_weight_that_ranks_the_validation_gold_first():
    # query 0: gold 7 needs w > 1.25 (-1.0 + 0.6w > -0.5 + 0.2w); query 1: gold 4 wins at any w <= 2.5
    items = np.array([[3, 7], [4, 8]])
    lp = np.array([[-0.5, -1.0], [-0.1, -1.1]])
    cos = np.array([[0.2, 0.6], [0.5, 0.9]])
    fit = fit_weight(items, lp, cos, np.array([7, 4]), [0.0, 1.0, 2.0, 4.0])
    assert fit["weight"] == 2.0 and fit["val_at_weight"]["R@1"] == 100.0
    assert fit["val_generative_only"]["R@1"] == 50.0 and fit["candidate_recall"] == 100.0
    with pytest.raises(HybridError, match="no validation queries"):
        fit_weight(np.zeros((0, 2), int), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, int), [0.0])


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_item_vector_storages_bytes_and_cosines(tmp_path):
    rng = np.random.default_rng(0)
    vec, q = _unit(rng, 300, 32), _unit(rng, 4, 32)
    ids = [f"i{i}" for i in range(300)]
    rows = np.array([[0, 5, -1], [7, 8, 9], [1, 2, 3], [299, 0, 4]])
    exact = np.einsum("bpd,bd->bp", vec[np.maximum(rows, 0)], q)
    sizes = {}
    for storage, tol in (("float32", 1e-6), ("int8", 0.02), ("pq", 0.35)):
        s = ItemVectorSet.build(ids, vec, storage, pq_bytes=8)
        s.save(tmp_path / storage)
        s = ItemVectorSet.load(tmp_path / storage, storage, 32)
        cos = s.cosine(q, rows)
        assert cos[0, 2] == 0.0  # padded slot
        np.testing.assert_allclose(cos[rows >= 0], exact[rows >= 0], atol=tol)
        sizes[storage] = s.bytes_per_item()
    assert sizes == {"float32": 128.0, "int8": 36.0, "pq": 8.0}


def test_bad_vectors_and_missing_scorer_give_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    vec = _unit(rng, 10, 8)
    bad = vec.copy()
    bad[3, 2] = np.nan
    with pytest.raises(HybridError, match=r"NaN or infinite values \(rows \[3\]\)"):
        ItemVectorSet.build([str(i) for i in range(10)], bad)
    with pytest.raises(HybridError, match="all zeros"):
        ItemVectorSet.build([str(i) for i in range(10)], np.zeros((10, 8)))
    with pytest.raises(HybridError, match="10 item ids but 9"):
        ItemVectorSet.build([str(i) for i in range(10)], vec[:9])
    s = ItemVectorSet.build([str(i) for i in range(10)], vec)
    with pytest.raises(HybridError, match="dimension 8"):
        s.cosine(_unit(rng, 2, 16), np.zeros((2, 3), int))
    with pytest.raises(HybridError, match="no hybrid item vector"):
        s.rows_of(["0", "nope"])
    with pytest.raises(HybridError, match="has no hybrid item vectors"):
        HybridScorer.load(tmp_path)
    with pytest.raises(HybridError, match="no text"):
        mean_vectors([["a"], []], lambda t: _unit(rng, len(t), 8), ["x", "y"])


def test_item_texts_count_a_document_that_is_also_a_query_once():
    assert item_texts("a dog", ["a dog", "a puppy"], "doc_plus_queries") == ["a dog", "a puppy"]
    assert item_texts("a dog", ["a dog", "a puppy"], "document") == ["a dog"]
    assert item_texts(None, ["a puppy"], "doc_plus_queries") == ["a puppy"]


def test_query_vectors_from_the_models_encoder_equal_the_minilm_sentence_embedding():
    from ace.data.encoders import MINILM, TextEncoder, resolve_text_model
    from ace.model.modeling import AceConfig, AceModel
    from ace.model.tokens import QueryTokenizer

    path = resolve_text_model("minilm")
    model = AceModel(AceConfig(d_model=384, n_heads=6, encoder_layers=3, decoder_layers=1, ffn_dim=64,
                               max_query_length=40, level_sizes=[4, 4, 4], pretrained_encoder=path))
    qtok = QueryTokenizer.from_pretrained(path, max_length=40)
    texts = ["a dog runs on the beach", "two men play chess in a park", "x"]
    ours = encode_texts(model, qtok, texts)
    ref = TextEncoder(MINILM, device="cpu").encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny untrained AceModel over 40 synthetic items: (task, identifier tokenizer, query tokenizer, model, vocab)."""
    from ace.model.modeling import AceModel
    from ace.bench.synthetic import make_synthetic_task, synthetic_model_config
    from ace.model.tokens import IdentifierVocab, QueryTokenizer
    from identifiers.config import IdentifierConfig
    from identifiers.semantic_ids import SemanticIdTokenizer

    task = make_synthetic_task(40, dim=32, seed=0)
    tok = SemanticIdTokenizer.fit(task.embeddings, task.item_ids, IdentifierConfig(
        K=4, M=1, codebook_size=4, max_u=32, kmeans_n_init=1, kmeans_max_iter=20, hidden_dims=(32,), latent_dim=8,
        rqvae_max_steps=30, rqvae_batch_size=64, codebook_kmeans_iters=5, seed=0))
    qtok = QueryTokenizer.train([q for q, _ in task.train_pairs], vocab_size=60, max_length=24)
    torch.manual_seed(0)
    model = AceModel(synthetic_model_config(qtok.vocab_size, tok.level_sizes, d_model=32, n_heads=2,
                                            encoder_layers=1, decoder_layers=1, ffn_dim=64)).eval()
    return task, tok, qtok, model, IdentifierVocab(tok.level_sizes)


def test_teacher_forced_identifier_scores_equal_the_beam_search_scores(tiny_model):
    from ace.model.decoding import constrained_beam_search, score_identifiers

    task, tok, qtok, model, vocab = tiny_model
    enc = qtok([q for q, _ in task.val_pairs[:5]])
    state: dict = {}
    items, full = constrained_beam_search(model, enc.input_ids, enc.attention_mask, tok.trie.flat(), vocab,
                                          num_beams=8, top_k=8, state=state)
    tokens = torch.as_tensor(vocab.encode(tok.codes[items.clamp_min(0).numpy()]))        # (B, P, L)
    L = vocab.length
    tf_full = score_identifiers(model, state["memory"], state["mask"], tokens, L)
    tf_prefix = score_identifiers(model, state["memory"], state["mask"], tokens, L - 1)
    ok = items >= 0
    torch.testing.assert_close(tf_full[ok], full[ok], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tf_prefix[ok], state["prefix_scores"][ok], atol=1e-4, rtol=1e-4)
    assert (tf_prefix[ok] >= tf_full[ok] - 1e-6).all()


def test_pipeline_stage_fits_the_weight_on_held_out_training_queries(hybrid_run, tmp_path):
    import shutil

    from ace.config import load_config
    from ace.newitems.hybrid import search_merged
    from ace.pipeline.stages import Pipeline, PipelineError, RunConfig, read_pairs
    from ace.serving.retriever import Retriever

    run = hybrid_run
    held = read_pairs(run / "scorer_queries.json")
    trained = read_pairs(run / "train_queries.json")
    assert len(held) == 12 and len({iid for _, iid in held}) == 12
    info = json.loads((run / "hybrid" / "scorer.json").read_text())
    assert info["weight"] in RunConfig().hybrid.weights and info["fit"]["queries"] == 12
    assert info["items"] == 36 and info["dim"] == 32 and info["bytes_per_item"] == 128
    # the training stage did not see the held-out queries (its marker counts the pairs it trained on)
    rec = json.loads((run / "stages" / "train.json").read_text())
    assert rec["train_pairs"] == len(trained) - 12 and rec["scorer_queries"] == 12

    r = Retriever.from_run(run, device="cpu", fallback=False)
    scorer = HybridScorer.load(run)
    ids = r.id_tokenizer.trie.item_ids
    qs = [q for q, _ in held]
    for row in search_merged(r.model, r.query_tokenizer, r.trie(), ids, r.vocab, scorer, qs, 8, 5):
        assert len(row) == 5 and all(h.source == "generative" for h in row)
        np.testing.assert_allclose([h.score for h in row], [h.logprob + scorer.weight * h.cosine for h in row])
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    r.close()

    # a fixed weight (a grid without 0, as configs/demo.yaml has) and the full identifier in the log-prob
    fixed = tmp_path / "fixed"
    shutil.copytree(run, fixed, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    cfg = load_config(RunConfig, run / "config.yaml", [f"run_dir={fixed}", "hybrid.weights=[3.0]", "hybrid.levels=full"])
    Pipeline(cfg, progress=False).run_all(until="hybrid")
    info = json.loads((fixed / "hybrid" / "scorer.json").read_text())
    assert info["weight"] == 3.0 and info["levels"] == "full" and info["fit"]["val_generative_only"] is None
    assert json.loads((fixed / "stages" / "train.json").read_text())["key"] == rec["key"]  # only the hybrid stage re-ran

    bad = load_config(RunConfig, run.parent / "tiny.yaml", ["hybrid.enabled=true", "fallback.enabled=false",
                                                             f"run_dir={tmp_path / 'bad'}"])
    with pytest.raises(PipelineError, match="split.scorer_queries > 0"):
        Pipeline(bad, progress=False)  # at once, before any stage trains


def test_merged_search_scores_both_paths_with_the_same_fusion(tiny_model):
    from ace.model.decoding import constrained_beam_search, score_identifiers
    from ace.newitems.hybrid import FallbackItems, search_merged

    task, tok, qtok, model, vocab = tiny_model
    ids = list(tok.trie.item_ids)
    rng = np.random.default_rng(1)
    vec = _unit(rng, len(ids), 32)
    # the last 10 items leave the trie and come back as "added" (fallback) items with their identifiers
    added = ids[30:]
    rows = [ids.index(i) for i in added]
    import copy
    trained_tok = copy.deepcopy(tok)
    trained_tok.remove(added)
    table = list(trained_tok.trie.item_ids)
    scorer = HybridScorer(ItemVectorSet.build(ids[:30], vec[:30]), 3.0, "prefix", 8, {})
    fb = FallbackItems(added, vec[30:], vocab.encode(tok.codes[rows]))
    queries = [q for q, _ in task.val_pairs[:6]]
    hits = search_merged(model, qtok, trained_tok.trie.flat(), table, vocab, scorer, queries, 8, 10, fallback=fb,
                         fallback_candidates=4)
    enc = qtok(queries)
    state: dict = {}
    constrained_beam_search(model, enc.input_ids, enc.attention_mask, trained_tok.trie.flat(), vocab, num_beams=8,
                            top_k=8, state=state)
    from ace.newitems.candidates import sentence_vectors
    qv = sentence_vectors(state["last_hidden"], enc.attention_mask)
    row_of = {iid: i for i, iid in enumerate(ids)}
    levels = vocab.length - 1
    best = state["prefix_scores"].numpy().max(1)           # the best generative candidate's log-prob per query
    flat = trained_tok.trie.flat()
    seen_sources = set()
    for i, row in enumerate(hits):
        assert len(row) == 10 and [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        for h in row:
            seen_sources.add(h.source)
            assert h.cosine == pytest.approx(float(vec[row_of[h.item_id]] @ qv[i]), abs=1e-5)
            assert h.score == pytest.approx(h.logprob + 3.0 * h.cosine, abs=1e-6)
            assert (h.source == "fallback") == (h.item_id in added)
            code = tok.codes[row_of[h.item_id]]
            tokens = torch.as_tensor(vocab.encode(np.repeat(code[None, None], len(queries), 0)))     # (Q, 1, L)
            tf = score_identifiers(model, state["memory"], state["mask"], tokens, levels, per_level=True)[i, 0]
            if h.source == "generative":   # the beam search's own log-prob of the prefix
                assert h.logprob == pytest.approx(float(tf.sum()), abs=1e-4)
            else:   # teacher-forced up to the deepest prefix a trained item shares, the best per-level log-prob after it
                depth = next(d for d in range(levels, -1, -1) if d == 0 or flat.walk(list(code[:d])) >= 0)
                want = float(tf[:depth].sum()) + (levels - depth) * float(best[i]) / levels
                assert h.logprob == pytest.approx(want, abs=1e-4)
    assert seen_sources == {"generative", "fallback"}


def test_dense_candidates_add_the_trie_items_nearest_the_query_the_beams_missed(tiny_model):
    from ace.model.decoding import constrained_beam_search, score_identifiers
    from ace.newitems.candidates import sentence_vectors
    from ace.newitems.hybrid import search_merged

    task, tok, qtok, model, vocab = tiny_model
    ids = list(tok.trie.item_ids)
    queries = [q for q, _ in task.val_pairs[:6]]
    enc = qtok(queries)
    state: dict = {}
    beam_rows, _ = constrained_beam_search(model, enc.input_ids, enc.attention_mask, tok.trie.flat(), vocab,
                                           num_beams=3, top_k=3, state=state)
    qv = sentence_vectors(state["last_hidden"], enc.attention_mask)
    # item vectors: item j of query i's "planted" set points exactly at query i, so the nearest items are known
    rng = np.random.default_rng(3)
    vec = _unit(rng, len(ids), 32)
    missed = [next(r for r in range(len(ids)) if r not in set(beam_rows[i].tolist()) and r % 6 == i)
              for i in range(len(queries))]
    for i, r in enumerate(missed):
        vec[r] = qv[i]
    stored_codes = np.asarray(tok.codes)
    for dense in (2, 0):
        scorer = HybridScorer(ItemVectorSet.build(ids, vec), 5.0, "full", 3, {}, dense_candidates=dense)
        pool = DensePool.build(scorer.vectors, ids, stored_codes)
        hits = search_merged(model, qtok, tok.trie.flat(), ids, vocab, scorer, queries, 3, 5, dense_pool=pool)
        for i, row in enumerate(hits):
            got = {h.item_id: h for h in row}
            assert len(got) == len(row)                                    # no item twice
            if dense:
                h = got[ids[missed[i]]]                                    # the beams missed it, the scan found it
                assert h.source == "dense" and h.cosine == pytest.approx(1.0, abs=1e-5)
                tokens = torch.as_tensor(vocab.encode(stored_codes[[missed[i]]]))[None].repeat(len(queries), 1, 1)
                tf = score_identifiers(model, state["memory"], state["mask"], tokens, vocab.length)[i, 0]
                assert h.logprob == pytest.approx(float(tf), abs=1e-4)    # its whole identifier, teacher-forced
                assert h.score == pytest.approx(h.logprob + 5.0 * h.cosine, abs=1e-6)
                assert sum(x.source == "dense" for x in row) <= 2
            else:
                assert {h.source for h in row} == {"generative"}
    # an item whose identifier is no longer in the trie (-1 codes) is never a dense candidate
    gone = stored_codes.copy()
    gone[missed] = -1
    scorer = HybridScorer(ItemVectorSet.build(ids, vec), 5.0, "full", 3, {}, dense_candidates=2)
    pool = DensePool(ids, vec.astype(np.float32), gone, np.arange(len(ids)))
    hits = search_merged(model, qtok, tok.trie.flat(), ids, vocab, scorer, queries, 3, 5, dense_pool=pool)
    assert not any(h.item_id == ids[missed[i]] and h.source == "dense" for i, row in enumerate(hits) for h in row)
    with pytest.raises(HybridError, match="dense_pool"):
        search_merged(model, qtok, tok.trie.flat(), ids, vocab, scorer, queries, 3, 5)
    # an item whose vector was built after training (folded; a view that withdrew its stored one) is found too,
    # by its new vector: the stored one is not used
    later = {ids[missed[0]]: vec[missed[0]]}
    elsewhere = vec.copy()
    elsewhere[missed[0]] = -vec[missed[0]]                   # the stored vector points away from the query
    vectors = ItemVectorSet.build(ids, elsewhere)
    withdrawn = copy.copy(vectors)
    withdrawn.row = {i: r for i, r in vectors.row.items() if i != ids[missed[0]]}
    pool = DensePool.build(withdrawn, ids, stored_codes, later)
    assert pool.stored[pool.index[ids[missed[0]]]] == -1
    scorer = HybridScorer(withdrawn, 5.0, "full", 3, {}, dense_candidates=2)
    hits = search_merged(model, qtok, tok.trie.flat(), ids, vocab, scorer, queries, 3, 5,
                         extra_vectors=later, dense_pool=pool)
    h = {x.item_id: x for x in hits[0]}[ids[missed[0]]]
    assert h.source == "dense" and h.cosine == pytest.approx(1.0, abs=1e-5)
    assert ids[missed[0]] not in DensePool.build(withdrawn, ids, stored_codes).index      # no vector: not in the pool
    assert ids[missed[0]] not in DensePool.build(vectors, ids, stored_codes, exclude=[ids[missed[0]]]).index
    with pytest.raises(HybridError, match="dense_candidates"):
        HybridConfig(dense_candidates=-1)


def _thirty_trained(tiny_model):
    """The tiny model's first 30 items trained (trie), the rest added (FallbackItems), random unit vectors."""
    import copy
    from types import SimpleNamespace

    from ace.newitems.hybrid import FallbackItems

    task, tok, qtok, model, vocab = tiny_model
    ids = list(tok.trie.item_ids)
    vec = _unit(np.random.default_rng(2), len(ids), 32)
    added = ids[30:]
    trained_tok = copy.deepcopy(tok)
    trained_tok.remove(added)
    fb = FallbackItems(added, vec[30:], vocab.encode(tok.codes[[ids.index(i) for i in added]]))
    return SimpleNamespace(task=task, model=model, qtok=qtok, vocab=vocab, ids=ids, vec=vec, added=added, fb=fb,
                           trie=trained_tok.trie.flat(), trained_ids=list(trained_tok.trie.item_ids),
                           queries=[q for q, _ in task.val_pairs[:6]],
                           vectors=ItemVectorSet.build(ids[:30], vec[:30]))


def test_added_levels_none_scores_every_added_item_at_the_best_candidates_log_prob(tiny_model):
    from ace.model.decoding import constrained_beam_search
    from ace.newitems.hybrid import search_merged

    t = _thirty_trained(tiny_model)
    model, qtok, vocab, queries = t.model, t.qtok, t.vocab, t.queries
    scorer = HybridScorer(t.vectors, 3.0, "prefix", 8, {}, added_levels="none")
    hits = search_merged(model, qtok, t.trie, t.trained_ids, vocab, scorer, queries, 8, 12, fallback=t.fb,
                         fallback_candidates=4)
    enc = qtok(queries)
    state: dict = {}
    constrained_beam_search(model, enc.input_ids, enc.attention_mask, t.trie, vocab, num_beams=8,
                            top_k=8, state=state)
    best = state["prefix_scores"].numpy().max(1)
    n_fallback = 0
    for i, row in enumerate(hits):
        for h in row:
            if h.source == "fallback":
                n_fallback += 1
                assert h.logprob == pytest.approx(float(best[i]), abs=1e-4)
    assert n_fallback > 0
    with pytest.raises(HybridError, match="added_levels"):
        HybridConfig(added_levels="some")


def test_neighbour_completion_takes_the_log_prob_of_the_most_alike_candidate_less_the_penalty():
    from ace.newitems.hybrid import neighbour_completion

    lp = np.array([[-1.0, -3.0, -6.0, -np.inf], [-2.0, -4.0, -5.0, -7.0], [-np.inf] * 4])
    rows = np.array([[0, 1, 2, -1], [3, 4, 5, 6], [-1] * 4])
    sim = np.zeros((3, 2, 4))
    sim[0, 0] = [0.2, 1.0, 0.5, 1.0]     # added item 0 of query 0 is candidate 1 (the pad's 1.0 must not count)
    sim[0, 1] = [0.1, 0.1, 0.1, 0.1]     # added item 1 is unlike every candidate
    sim[1, :] = [0.9, 0.0, 0.0, 0.0]
    out = neighbour_completion(lp, rows, sim, 0.0)                   # penalty 0: the best candidate's, for every item
    assert out[:2].tolist() == [[-1.0, -1.0], [-2.0, -2.0]] and out[2].tolist() == [0.0, 0.0]   # no candidate: 0
    out = neighbour_completion(lp, rows, sim, 10.0)
    assert out[0, 0] == pytest.approx(-3.0)                          # its twin's log-prob (-1 - 10 * 0.8 = -9 is less)
    assert out[0, 1] == pytest.approx(-1.0 - 10 * 0.9)               # unlike all: the best, discounted by its distance
    assert out[1].tolist() == pytest.approx([-3.0, -3.0])
    assert (neighbour_completion(lp, rows, sim, 10.0)[:2] <= neighbour_completion(lp, rows, sim, 0.0)[:2]).all()
    with pytest.raises(HybridError, match="added_neighbour"):
        HybridConfig(added_neighbour=-0.1)


def test_signature_completion_credits_an_added_item_with_the_candidates_its_own_texts_reach():
    from ace.newitems.hybrid import signature_completion

    lp = np.array([[np.log(0.6), np.log(0.3), np.log(0.05)], [np.log(0.5), -np.inf, -np.inf], [-np.inf] * 3])
    cand = [["a", "b", "c"], ["b", None, None], [None, None, None]]
    sigs = [{"a": 1.0}, {"b": 0.5, "z": 0.5}, {"z": 1.0}]
    top = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    out = signature_completion(lp, cand, sigs, top)
    assert out[0, 0] == pytest.approx(np.log(0.6))          # its home is the query's top candidate: its log-prob
    assert out[0, 1] == pytest.approx(np.log(0.3))          # home b (0.5 of its mass, as z)
    assert out[0, 2] == pytest.approx(np.log(0.05))         # reaches nothing the query reached: the weakest candidate's
    assert out[1].tolist() == pytest.approx([np.log(0.5), np.log(0.5), np.log(0.5)])   # floor = the one candidate
    assert out[2].tolist() == [0.0, 0.0, 0.0]                                        # no candidate at all


def test_merged_search_with_signatures_scores_added_items_by_their_own_texts(tiny_model):
    from ace.newitems.hybrid import item_signatures, search_merged

    t = _thirty_trained(tiny_model)
    texts = {}
    for q, iid in t.task.train_pairs:
        texts.setdefault(iid, []).append(q)
    sigs = item_signatures(t.model, t.qtok, t.trie, t.trained_ids, t.vocab, [texts[i][:3] for i in t.added], 8, "prefix")
    assert len(sigs) == len(t.added) and all(abs(sum(sg.values()) - 1) < 1e-6 and set(sg) <= set(t.trained_ids)
                                             for sg in sigs)
    fb, added = t.fb, t.added
    scorer = HybridScorer(t.vectors, 3.0, "prefix", 8, {}, added_levels="signature")
    args = (t.model, t.qtok, t.trie, t.trained_ids, t.vocab, scorer, t.queries, 8, 40)
    with pytest.raises(HybridError, match="signatures"):
        search_merged(*args, fallback=fb, fallback_candidates=4)
    fb.signatures = sigs
    hits = search_merged(*args, fallback=fb, fallback_candidates=4)
    n = 0
    for row in hits:
        gen = [h for h in row if h.source == "generative"]
        for h in row:
            if h.source == "fallback":
                n += 1
                sg = sigs[added.index(h.item_id)]
                expect = max([g.logprob + np.log(sg[g.item_id] / max(sg.values())) for g in gen if g.item_id in sg]
                             + [min(g.logprob for g in gen)])
                assert h.logprob == pytest.approx(expect, abs=1e-4)
    assert n > 0


def test_added_boost_lifts_every_added_items_log_prob_by_the_same_nats(tiny_model):
    from ace.newitems.hybrid import search_merged

    t = _thirty_trained(tiny_model)
    args = (t.model, t.qtok, t.trie, t.trained_ids, t.vocab)

    def hits_with(boost):
        scorer = HybridScorer(t.vectors, 3.0, "prefix", 8, {}, added_levels="none", added_boost=boost)
        return search_merged(*args, scorer, t.queries, 8, 40, fallback=t.fb, fallback_candidates=4)

    base, lifted = hits_with(0.0), hits_with(2.5)
    for row_b, row_l in zip(base, lifted):
        b = {(h.item_id, h.source): h for h in row_b}
        assert b.keys() == {(h.item_id, h.source) for h in row_l}          # the same candidates
        for h in row_l:
            expect = b[h.item_id, h.source].logprob + (2.5 if h.source == "fallback" else 0.0)
            assert h.logprob == pytest.approx(expect, abs=1e-5)
            assert h.score == pytest.approx(h.logprob + 3.0 * h.cosine, abs=1e-5)   # the hand-computed fusion
        order = sorted(row_b, key=lambda h: -(h.score + (2.5 if h.source == "fallback" else 0.0)))
        assert [h.item_id for h in row_l] == [h.item_id for h in order]
    assert any(h.source == "fallback" for row in lifted for h in row)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(HybridError, match="added_boost"):
            HybridConfig(added_boost=bad)


def test_merged_search_with_added_neighbour_discounts_added_items_unlike_the_candidates(tiny_model):
    from ace.newitems.hybrid import search_merged

    t = _thirty_trained(tiny_model)
    ids, vec, queries, fb = t.ids, t.vec, t.queries, t.fb
    args = (t.model, t.qtok, t.trie, t.trained_ids, t.vocab)

    def fallback_hits(neighbour):
        scorer = HybridScorer(t.vectors, 3.0, "prefix", 8, {}, added_levels="none", added_neighbour=neighbour)
        hits = search_merged(*args, scorer, queries, 8, 40, fallback=fb, fallback_candidates=4)
        return {(i, h.item_id): h for i, row in enumerate(hits) for h in row if h.source == "fallback"}

    base, disc = fallback_hits(0.0), fallback_hits(0.5)
    assert base.keys() == disc.keys() and base
    gen = search_merged(*args, HybridScorer(t.vectors, 3.0, "prefix", 8, {}), queries, 8, 8)
    for (i, iid), h in disc.items():
        cands = [g.item_id for g in gen[i]]
        sims = vec[[ids.index(c) for c in cands]] @ vec[ids.index(iid)]
        expect = max(g.logprob - 0.5 * 3.0 * (1 - s) for g, s in zip(gen[i], sims))
        assert h.logprob == pytest.approx(expect, abs=1e-4) and h.logprob <= base[(i, iid)].logprob + 1e-9
        assert h.cosine == pytest.approx(base[(i, iid)].cosine) and h.score == pytest.approx(h.logprob + 3.0 * h.cosine)


def test_untrained_levels_of_added_items_get_the_best_per_level_log_prob():
    from ace.newitems.candidates import trained_depth
    from ace.newitems.hybrid import untrained_completion
    from identifiers.trie import FlatTrie

    trie = FlatTrie.from_codes(np.array([[0, 1, 2, 0], [0, 2, 0, 0], [1, 0, 0, 0]]), [2, 3, 3, 4])
    codes = np.array([[[0, 1, 2, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 2, 0, 3]]])     # (Q=1, F=4, L=4)
    depth = trained_depth(trie, codes, 3)
    assert depth.tolist() == [[3, 2, 1, 3]]
    assert trained_depth(None, codes, 3).tolist() == [[0, 0, 0, 0]]
    level_lp = np.array([[[-1.0, -2.0, -3.0]] * 4])                                          # (1, 4, 3)
    gen_lp, gen_rows = np.array([[-0.6, -3.0, -9.0]]), np.array([[0, 2, -1]])                 # best valid: -0.6
    out = untrained_completion(level_lp, depth, gen_lp, gen_rows)
    assert out == pytest.approx(np.array([[-6.0, -3.0 - 0.2, -1.0 - 0.4, -6.0]]))
    # no generative candidate: the untrained levels count 0, so the cosine alone ranks added items
    assert untrained_completion(level_lp, np.zeros((1, 4), int), gen_lp, -np.ones_like(gen_rows)) == pytest.approx(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------- Retriever: modes, merged search
NEW = [("purple", "kite"), ("orange", "kite"), ("purple", "lamp"), ("orange", "lamp"), ("grey", "kite"), ("grey", "lamp")]


HYBRID_RUN_OVERRIDES = ["split.scorer_queries=12", "hybrid.enabled=true", "hybrid.candidates=10", "device=cpu",
                        "identifiers.max_u=1024", "fallback.calibration_queries=36", "fallback.tower.epochs=20",
                        "fallback.tower.batch_size=32", "fallback.tower.device=cpu", "fallback.hash.bits=64",
                        "fallback.hash.steps=100", "fallback.hash.device=cpu", "fallback.index.kind=flat"]


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """The tiny pipeline run (36 items) with the fallback and hybrid stages."""
    from ace.config import load_config
    from ace.pipeline.stages import Pipeline, RunConfig
    from tests.test_pipeline import config

    tmp = tmp_path_factory.mktemp("hybrid_run")
    Pipeline(load_config(RunConfig, config(tmp), HYBRID_RUN_OVERRIDES), progress=False).run_all(until="hybrid")
    return tmp / "run"


def _r_at(hits, targets, k):
    return 100 * np.mean([t in [h.item_id for h in row[:k]] for row, t in zip(hits, targets)])


def test_hybrid_mode_is_the_default_and_every_hit_says_its_mode(hybrid_run, tmp_path):
    import shutil

    from ace.serving.retriever import Retriever, RetrieverError

    run = tmp_path / "run"
    shutil.copytree(hybrid_run, run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    r = Retriever.from_run(run, device="cpu")
    q = ["a red car", "the dog is blue"]
    auto, hyb = r.search(q, k=5), r.search(q, k=5, mode="hybrid")
    assert [[(h.item_id, h.score) for h in row] for row in auto] == [[(h.item_id, h.score) for h in row] for row in hyb]
    for row in hyb:
        for h in row:
            assert h.mode == "hybrid" and h.source == "generative"
            assert h.score == pytest.approx(h.raw_score + r.hybrid.scorer.weight * h.cosine)
    assert all(h.mode == "generative" for row in r.search(q, k=5, mode="generative") for h in row)
    with pytest.raises(RetrieverError, match="unknown search mode 'best'"):
        r.search(q, mode="best")
    r.close()
    # a run without RUN/hybrid: hybrid mode is a clear error, auto falls back to the documented merged/generative
    shutil.rmtree(run / "hybrid")
    r = Retriever.from_run(run, device="cpu")
    with pytest.raises(RetrieverError, match=r"hybrid search needs the run's hybrid item vectors .*RUN/hybrid"):
        r.search(q, mode="hybrid")
    assert all(h.mode == "generative" for row in r.search(q, k=3) for h in row)
    r.close()
    # stored vectors of another dimension: a clear error at load
    shutil.copytree(hybrid_run / "hybrid", run / "hybrid")
    info = json.loads((run / "hybrid" / "scorer.json").read_text())
    info["dim"] = 16
    (run / "hybrid" / "scorer.json").write_text(json.dumps(info))
    with pytest.raises(RetrieverError, match="dimension 16 but the model's encoder gives 32"):
        Retriever.from_run(run, device="cpu")


@pytest.mark.parametrize("added_levels", ["none", "signature"])
def test_merged_search_with_the_shared_scorer_is_never_worse_than_either_path(hybrid_run, tmp_path, added_levels):
    """Constructed case: 6 items added after training (new colours and things). Old items' held-out
    queries through the generative path alone, new items' queries through the fallback path alone,
    and both through merged search: with one scorer, merged search loses neither set (under either
    rule for an added item's log-prob)."""
    import shutil

    from ace.data.corpus import CorpusItem
    from ace.pipeline.stages import read_pairs
    from ace.serving.retriever import Retriever

    run = tmp_path / "run"
    shutil.copytree(hybrid_run, run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    r = Retriever.from_run(run, device="cpu")
    r.hybrid.scorer.added_levels = added_levels
    rng = np.random.default_rng(5)
    new_items, new_pairs = [], []
    for c, t in NEW:
        iid = f"{c}-{t}"
        captions = [f"a {c} {t}", f"the {t} is {c}", f"photo of a {c} {t}"]
        new_items.append(CorpusItem(iid, "image", embedding=rng.standard_normal(24).astype(np.float32), captions=captions))
        new_pairs.append((f"{c} coloured {t}", iid))
    r.add_items(new_items)
    old_pairs = read_pairs(run / "test_queries.json")
    oq, ot = [q for q, _ in old_pairs], [t for _, t in old_pairs]
    nq, nt = [q for q, _ in new_pairs], [t for _, t in new_pairs]
    for k in (1, 5):
        old_alone = _r_at(r.search(oq, k=k, num_beams=10, mode="generative"), ot, k)
        new_alone = _r_at(r.search(nq, k=k, mode="fallback"), nt, k)
        old_merged = r.search(oq, k=k, num_beams=10, mode="hybrid")
        new_merged = r.search(nq, k=k, num_beams=10, mode="hybrid")
        assert _r_at(old_merged, ot, k) >= old_alone, k
        assert _r_at(new_merged, nt, k) >= new_alone, k
        assert {h.source for row in new_merged for h in row} == {"generative", "fallback"} or k == 1
    # every fallback hit is scored like a generative one: log-prob of its identifier prefix + w * cosine
    fb_hits = [h for row in r.search(nq, k=5, num_beams=10) for h in row if h.source == "fallback"]
    assert fb_hits and all(h.score == pytest.approx(h.raw_score + r.hybrid.scorer.weight * h.cosine) for h in fb_hits)
    # signatures are made once per added item, on the first search that needs them, and kept across later adds
    # and modality filters (the generative items are the same); a deleted trained item makes them anew
    assert len(r.hybrid._signatures) == (len(new_items) if added_levels == "signature" else 0)
    if added_levels == "signature":
        first = dict(r.hybrid._signatures)
        r.add_items([CorpusItem("grey-cup", "image", embedding=rng.standard_normal(24).astype(np.float32),
                                captions=["a grey cup", "the cup is grey"])])
        r.search(nq, k=5, num_beams=10)
        r.search(nq, k=5, num_beams=10, modality="image")
        assert len(r.hybrid._signatures) == len(new_items) + 1
        assert all(r.hybrid._signatures[i] is sig for i, sig in first.items())
        r.delete_items([ot[0]])
        r.search(nq, k=5, num_beams=10)
        assert all(r.hybrid._signatures[i] is not sig and ot[0] not in r.hybrid._signatures[i]
                   for i, sig in first.items())
    r.close()


def test_post_search_exposes_the_mode_and_each_hit_says_which_mode_scored_it(hybrid_run, tmp_path):
    import shutil
    import sys
    from pathlib import Path

    import httpx

    from ace.config import ServeConfig
    from ace.serving.retriever import Retriever
    from ace.serving.server import create_app

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_support import running_server

    run = tmp_path / "run"
    shutil.copytree(hybrid_run, run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    r = Retriever.from_run(run, device="cpu")
    with running_server(create_app(r, ServeConfig())) as url:
        auto = httpx.post(url + "/search", json={"query": "a red car", "k": 3}, timeout=60).json()["results"]
        gen = httpx.post(url + "/search", json={"query": "a red car", "k": 3, "mode": "generative"}, timeout=60).json()
        bad = httpx.post(url + "/search", json={"query": "a red car", "mode": "best"}, timeout=60)
    assert [h["mode"] for h in auto] == ["hybrid"] * 3
    lib = r.search(["a red car"], k=3, mode="hybrid")[0]
    assert [h["item_id"] for h in auto] == [h.item_id for h in lib]
    for h, g in zip(auto, lib):
        assert h["score"] == pytest.approx(g.score, abs=1e-5) and h["raw_score"] == pytest.approx(g.raw_score, abs=1e-5)
        assert h["cosine"] == pytest.approx(g.cosine, abs=1e-5)
    assert [h["mode"] for h in gen["results"]] == ["generative"] * 3 and all(h["cosine"] is None for h in gen["results"])
    assert bad.status_code == 422 and "mode" in bad.text
    r.close()


def test_a_run_built_with_dense_candidates_serves_them_and_says_so(hybrid_run, tmp_path):
    import dataclasses
    import shutil

    from ace.newitems.hybrid import HybridConfig
    from ace.pipeline.hybrid_stage import build_run_hybrid
    from ace.serving.retriever import Retriever

    run = tmp_path / "run"
    shutil.copytree(hybrid_run, run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    info = build_run_hybrid(run, dataclasses.replace(HybridConfig(enabled=True), candidates=3, dense_candidates=4,
                                                     levels="full", added_boost=1.5), device="cpu", seed=0)
    assert info["dense_candidates"] == 4 and info["added_levels"] == "none"      # the default since session 7
    r = Retriever.from_run(run, device="cpu")
    assert r.hybrid.scorer.dense_candidates == 4 and r.hybrid.scorer.added_levels == "none"
    assert info["added_boost"] == r.hybrid.scorer.added_boost == 1.5            # recorded and read back
    q = ["a red car", "the dog is blue", "a green kite"]
    r.hybrid.scorer.weight = w = 100.0          # the cosine decides, so the nearest items show up
    hits = r.search(q, k=10, num_beams=10, mode="hybrid")
    gen = r.search(q, k=10, num_beams=10, mode="generative")
    n_dense = 0
    for row, grow in zip(hits, gen):
        assert len(row) == 10 and len({h.item_id for h in row}) == 10       # no item twice
        beams = {h.item_id for h in grow}
        for h in row:
            assert (h.source == "generative") == (h.item_id in beams) and h.source in ("generative", "dense")
            assert h.mode == "hybrid" and h.score == pytest.approx(h.raw_score + w * h.cosine)
        n_dense += sum(h.source == "dense" for h in row)
    assert n_dense > 0
    # a modality filter keeps dense candidates inside that modality's items
    mod = r.catalog.modality
    some = next(iter(set(mod.values())))
    for row in r.search(q, k=10, num_beams=10, mode="hybrid", modality=some):
        assert all(mod[h.item_id] == some for h in row)
    r.close()


def test_the_eval_stage_runs_again_when_the_hybrid_stage_changed(hybrid_run, tmp_path, capsys):
    import shutil

    from ace.config import load_config
    from ace.pipeline.stages import Pipeline, RunConfig

    run = tmp_path / "run"
    shutil.copytree(hybrid_run, run, ignore=shutil.ignore_patterns("cache"))
    overrides = HYBRID_RUN_OVERRIDES + [f"run_dir={run}"]

    def pipeline(*extra):
        Pipeline(load_config(RunConfig, str(hybrid_run.parent / "tiny.yaml"), overrides + list(extra)),
                 progress=False).run_all(until="eval")
        return capsys.readouterr().out

    first = pipeline()
    assert "[train] up to date" in first and "[eval] running" in first
    assert "[eval] up to date" in pipeline()
    changed = pipeline("hybrid.weights=[7.0]")          # a new w: the search the eval measures changed
    assert "[hybrid] running" in changed and "[eval] running" in changed


def test_dense_candidates_reach_items_folded_in_after_training(tiny_model):
    """A folded item (in the trie, its vector built from its texts, none stored) is a dense candidate like a
    trained one: a fold must not leave its items findable by the beams alone."""
    from ace.data.corpus import CorpusItem
    from ace.newitems.hybrid import HybridIndex

    t = _thirty_trained(tiny_model)
    task, tok, qtok, model, vocab = tiny_model
    texts = t.queries + [q for q, _ in task.val_pairs[len(t.queries):len(t.added)]]
    folded = [CorpusItem(iid, "image", captions=[texts[i]]) for i, iid in enumerate(t.added)]
    found = {}
    for dense in (0, 3):
        index = HybridIndex(HybridScorer(t.vectors, 1.0, "full", 2, {}, dense_candidates=dense), model, qtok)
        hits = index.search(t.queries, 5, 2, trie=tok.trie.flat(), table_ids=t.ids, vocab=vocab, later_items=folded,
                            fallback_items=[], fallback_tokens=np.zeros((0, 1)), table_codes=np.asarray(tok.codes))
        found[dense] = [{h.item_id: h for h in row}.get(it.item_id) for row, it in zip(hits, folded)]   # query i: item i
    assert all(h is not None and h.cosine == pytest.approx(1.0, abs=1e-4) for h in found[3])   # its own text
    assert any(h is None for h in found[0])          # the two beams alone miss some of them
    assert any(h.source == "dense" for h in found[3])


def test_folded_items_offsets_shift_their_log_prob_and_nothing_else(tiny_model):
    """search_merged with ``offsets``: an offset item's log-prob is the model's plus its offset, its score
    log-prob + w x cosine; every other candidate scores as without offsets."""
    from ace.newitems.hybrid import search_merged

    task, tok, qtok, model, vocab = tiny_model
    ids = list(tok.trie.item_ids)
    vec = _unit(np.random.default_rng(3), len(ids), 32)
    scorer = HybridScorer(ItemVectorSet.build(ids, vec), 3.0, "prefix", 8, {})
    queries = [q for q, _ in task.val_pairs[:6]]
    plain = search_merged(model, qtok, tok.trie.flat(), ids, vocab, scorer, queries, 8, 8)
    shifted = {h.item_id: -2.5 for h in plain[0][:3]} | {plain[1][0].item_id: 1.0}
    moved = search_merged(model, qtok, tok.trie.flat(), ids, vocab, scorer, queries, 8, 8, offsets=shifted)
    for a, b in zip(plain, moved):
        assert {h.item_id for h in a} == {h.item_id for h in b}      # the same candidates, re-ranked
        was = {h.item_id: h for h in a}
        for h in b:
            assert h.logprob == pytest.approx(was[h.item_id].logprob + shifted.get(h.item_id, 0.0), abs=1e-9)
            assert h.score == pytest.approx(h.logprob + 3.0 * h.cosine, abs=1e-9)
        assert [h.score for h in b] == sorted((h.score for h in b), reverse=True)
    assert [h.item_id for h in moved[0]] != [h.item_id for h in plain[0]]   # the shift re-ranks this query


def test_folded_offsets_file_reads_back_and_bad_files_give_clear_errors(tmp_path):
    import json

    from ace.newitems.hybrid import offsets_document, read_offsets

    path = tmp_path / "folded_offsets.json"
    assert read_offsets(path) == {} and read_offsets(path, folds=True) == ({}, {})
    path.write_text(json.dumps(offsets_document({"a": -2.0, "b\u00e9": 1}, {"1": {"offset": -2.0}})))
    assert read_offsets(path) == {"a": -2.0, "b\u00e9": 1.0}
    assert read_offsets(path, folds=True)[1] == {"1": {"offset": -2.0}}
    with pytest.raises(HybridError, match="must be finite"):
        offsets_document({"a": float("nan")}, {})
    for text, match in [("{not json", "not readable JSON"), ("[1, 2]", "format_version"),
                        ('{"format_version": 1, "offsets": {"a": "x"}}', "not finite numbers"),
                        ('{"format_version": 1, "offsets": {"a": NaN}}', "not finite numbers"),
                        ('{"format_version": 1, "offsets": {"a": true}}', "not finite numbers"),
                        ('{"format_version": 9, "offsets": {}}', "format_version")]:
        path.write_text(text)
        with pytest.raises(HybridError, match=match):
            read_offsets(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HybridError, match="not readable JSON"):
        read_offsets(path)
