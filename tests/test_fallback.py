import numpy as np
import pytest
import torch

from ace.config import load_config
from ace.newitems.calibration import (Calibration, PlattCalibration, calibration_samples, fit_calibration,
                                      merge_rankings)
from ace.newitems.index import FallbackConfig, FallbackError, FallbackIndex
from ace.newitems.hashing import BinaryIndex, BinaryIndexConfig, HashConfig, HashHead, HashingError, hamming
from ace.metrics import recall_at_k
from ace.newitems.query_tower import QueryTower, QueryTowerConfig, QueryTowerError, info_nce, one_cycle

try:  # tests/ may or may not be a package
    from tests.fakes_fallback import TableEncoder, clustered_embeddings, synthetic_task
except ImportError:
    from fakes_fallback import TableEncoder, clustered_embeddings, synthetic_task

TOWER = dict(epochs=40, batch_size=32, lr=3e-3, device="cpu")


def _recall(tower, item_ids, z, pairs, k=1):
    q = tower.encode([t for _, t in pairs])
    top = np.argsort(-(q @ z.T), axis=1)[:, :k]
    return recall_at_k([[item_ids[i] for i in row] for row in top], [iid for iid, _ in pairs], k)


# ------------------------------------------------------------------------------ query tower
def test_info_nce_training_reduces_loss_and_improves_recall():
    item_ids, z, enc, train, test = synthetic_task()
    tower = QueryTower(config=QueryTowerConfig(**TOWER), text_encoder=enc, item_dim=z.shape[1])
    before = _recall(tower, item_ids, z, test)
    history = tower.fit(train, item_ids, z)
    after = _recall(tower, item_ids, z, test)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert after > before + 0.4, (before, after)
    assert after > 0.7


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 9, 10, 11, 19, 20, 57])
def test_one_cycle_schedule_works_for_any_step_count(steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = one_cycle(opt, max_lr=1.0, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0.0 < lr <= 1.0 + 1e-9 for lr in lrs), lrs
    assert max(lrs) == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        one_cycle(opt, max_lr=1.0, total_steps=0)


def test_query_tower_trains_on_tiny_data_with_ten_steps():
    # 10 optimiser steps (1 batch x 10 epochs) divided by zero in OneCycleLR's warm-up phase
    item_ids, z, enc, train, _ = synthetic_task()
    cfg = QueryTowerConfig(**{**TOWER, "epochs": 10, "batch_size": 64})
    tower = QueryTower(config=cfg, text_encoder=enc, item_dim=z.shape[1])
    history = tower.fit(train[:40], item_ids, z)
    assert len(history) == 10 and np.isfinite([h["loss"] for h in history]).all()


def test_info_nce_masks_duplicate_items_in_batch():
    q = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    items = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    targets = torch.tensor([0, 0, 1])
    same = targets[:, None] == torch.arange(2)[None, :]
    loss = info_nce(q, items, targets, torch.tensor(0.0), same_item=same)
    manual = torch.nn.functional.cross_entropy(q @ items.T, targets)
    assert torch.isclose(loss, manual)  # own item is the target, so nothing is masked here
    assert torch.isfinite(loss)


def test_symmetric_info_nce_pairs_each_item_with_its_own_query():
    items = torch.eye(3)
    perm = torch.tensor([2, 0, 1])              # query i belongs to item perm[i]
    q = items[perm]                              # every query equals its own item
    scale = torch.tensor(3.0)                    # exp(3) ~ 20: near one-hot softmax
    loss = info_nce(q, items, perm, scale, symmetric=True)
    wrong = info_nce(q, items, torch.tensor([0, 1, 2]), scale, symmetric=True)
    assert loss < 0.01 < wrong
    two = info_nce(items[[0, 0, 1, 2]], items, torch.tensor([0, 0, 1, 2]), scale, symmetric=True)
    assert torch.isfinite(two) and two < 0.5  # item 0 with two queries: both count as positives
    with pytest.raises(ValueError, match="every item column"):
        info_nce(q, items, torch.tensor([0, 0, 1]), scale, symmetric=True)


def test_all_items_negatives_and_mlp_projection_train():
    item_ids, z, enc, train, test = synthetic_task(seed=1)
    for kw in (dict(negatives="all_items"), dict(projection="mlp", hidden=32)):
        tower = QueryTower(config=QueryTowerConfig(**{**TOWER, **kw}), text_encoder=enc, item_dim=z.shape[1])
        tower.fit(train, item_ids, z)
        assert _recall(tower, item_ids, z, test, k=5) > 0.7, kw


def test_query_tower_bad_inputs():
    item_ids, z, enc, train, _ = synthetic_task(n_items=8)
    tower = QueryTower(config=QueryTowerConfig(**TOWER), text_encoder=enc, item_dim=z.shape[1])
    with pytest.raises(QueryTowerError, match="at least one"):
        tower.fit([], item_ids, z)
    with pytest.raises(QueryTowerError, match="unknown item ids"):
        tower.fit(train + [("nope", train[0][1])], item_ids, z)
    with pytest.raises(QueryTowerError, match="dimension 5, expected 12"):
        tower.fit(train, item_ids, np.ones((8, 5), np.float32))
    bad = z.copy()
    bad[2, 0] = np.nan
    with pytest.raises(QueryTowerError, match="NaN"):
        tower.fit(train, item_ids, bad)
    with pytest.raises(QueryTowerError, match="8 item ids but 7"):
        tower.fit(train, item_ids, z[:7])
    with pytest.raises(QueryTowerError, match="single string"):
        tower.encode("a query")
    with pytest.raises(QueryTowerError, match="needs item_dim"):
        QueryTower(config=QueryTowerConfig(**TOWER), text_encoder=enc)
    with pytest.raises(ValueError, match="projection"):
        QueryTowerConfig(projection="transformer")


def test_query_tower_save_load_roundtrip(tmp_path):
    item_ids, z, enc, train, test = synthetic_task(n_items=20)
    tower = QueryTower(config=QueryTowerConfig(**TOWER), text_encoder=enc, item_dim=z.shape[1])
    tower.fit(train, item_ids, z)
    tower.save(tmp_path / "tower")
    loaded = QueryTower.load(tmp_path / "tower", text_encoder=enc)
    texts = [t for _, t in test]
    np.testing.assert_allclose(loaded.encode(texts), tower.encode(texts), atol=1e-6)
    other = TableEncoder({"x": np.ones(7)})
    with pytest.raises(QueryTowerError, match="7-d vectors"):
        QueryTower.load(tmp_path / "tower", text_encoder=other)
    (tmp_path / "tower" / "meta.json").write_text("{not json")
    with pytest.raises(QueryTowerError, match="corrupt"):
        QueryTower.load(tmp_path / "tower", text_encoder=enc)


def test_dual_encoder_tower_passes_text_tower_through(tmp_path):
    _, _, enc, _, test = synthetic_task(n_items=5)
    tower = QueryTower(dual_encoder=enc, item_dim=enc.dim)
    texts = [t for _, t in test]
    np.testing.assert_allclose(tower.encode(texts), enc.encode(texts), atol=1e-6)
    with pytest.raises(QueryTowerError, match="not trained"):
        tower.fit(test, ["item0"], np.ones((1, enc.dim), np.float32))
    tower.save(tmp_path / "dual")
    with pytest.raises(QueryTowerError, match="dual_encoder"):
        QueryTower.load(tmp_path / "dual")
    assert QueryTower.load(tmp_path / "dual", dual_encoder=enc).is_dual


def test_for_item_encoder_picks_the_text_tower_of_a_dual_encoder():
    _, _, enc, _, test = synthetic_task(n_items=5)

    class Dual:  # stands in for ace.data.encoders.HFDualEncoder
        dim = enc.dim

        def encode_texts(self, texts):
            return enc.encode(texts)

    class MediaOnly:
        dim = 12

    texts = [t for _, t in test]
    dual = QueryTower.for_item_encoder(Dual())
    assert dual.is_dual and dual.projection is None
    np.testing.assert_allclose(dual.encode(texts), enc.encode(texts), atol=1e-6)
    projected = QueryTower.for_item_encoder(MediaOnly(), config=QueryTowerConfig(**TOWER), text_encoder=enc)
    assert not projected.is_dual and projected.encode(texts).shape == (len(texts), 12)


# ------------------------------------------------------------------------------ hashing
def _neighbour_recall(codes, x, k=5):
    """Share of each point's true k cosine neighbours found among its k Hamming neighbours."""
    true = np.argsort(-(x @ x.T), axis=1)[:, 1:k + 1]
    ham = hamming(codes, codes).astype(float)
    np.fill_diagonal(ham, np.inf)
    found = np.argsort(ham, axis=1, kind="stable")[:, :k]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(true, found)])


def test_hash_codes_preserve_neighbours_better_than_random_bits():
    x = clustered_embeddings(n=200, dim=32, clusters=10)
    head = HashHead(dim=32, config=HashConfig(bits=64, steps=150, batch_size=128, device="cpu"))
    history = head.fit(x)
    assert history[-1]["sim"] < 0.05
    codes = head.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (200, 8)
    rng = np.random.default_rng(0)
    random_codes = np.packbits(rng.random((200, 64)) > 0.5, axis=1)
    learned, chance = _neighbour_recall(codes, x), _neighbour_recall(random_codes, x)
    assert learned > chance + 0.3, (learned, chance)
    bits = head.codes(x)
    assert 0.2 < bits.mean() < 0.8  # bits are used, not constant


def test_hash_training_improves_on_its_initial_hyperplanes():
    x = clustered_embeddings(n=300, dim=32, clusters=30, spread=0.5, seed=3)
    head = HashHead(dim=32, config=HashConfig(bits=16, steps=300, batch_size=128, device="cpu"))
    before = _neighbour_recall(head.encode(x), x)
    head.fit(x)
    assert _neighbour_recall(head.encode(x), x) > before


def test_hash_head_save_load_and_bad_inputs(tmp_path):
    x = clustered_embeddings(n=50, dim=16)
    head = HashHead(dim=16, config=HashConfig(bits=32, steps=10, device="cpu"))
    head.fit(x)
    head.save(tmp_path / "h")
    np.testing.assert_array_equal(HashHead.load(tmp_path / "h").encode(x), head.encode(x))
    with pytest.raises(HashingError, match="dimension 8, expected 16"):
        head.encode(np.ones((2, 8), np.float32))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(HashingError, match="NaN"):
        head.fit(bad)
    with pytest.raises(ValueError, match="multiple of 8"):
        HashConfig(bits=60)
    with pytest.raises(HashingError, match="missing"):
        HashHead.load(tmp_path / "nothing")


# ------------------------------------------------------------------------------ binary index
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_binary_index_add_remove_search_save_load(tmp_path, kind):
    x = clustered_embeddings(n=120, dim=16, clusters=6)
    head = HashHead(dim=16, config=HashConfig(bits=64, steps=50, device="cpu"))
    head.fit(x)
    index = BinaryIndex(bits=64, dim=16, config=BinaryIndexConfig(kind=kind, ivf_nlist=2, ivf_nprobe=2,
                                                                  candidates=120))
    ids = np.arange(1000, 1120, dtype=np.int64)
    index.add(ids, head.encode(x), x)
    got, scores = index.search(head.encode(x[:10]), x[:10], k=3)
    assert (got[:, 0] == ids[:10]).all()  # each item is its own best match after re-ranking
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()

    index.remove(ids[:5])
    got, _ = index.search(head.encode(x[:10]), x[:10], k=10)
    assert not set(got.ravel().tolist()) & set(ids[:5].tolist())
    assert (got[5:, 0] == ids[5:10]).all()
    assert len(index) == 115

    index.save(tmp_path / "idx")
    loaded = BinaryIndex.load(tmp_path / "idx")
    got2, _ = loaded.search(head.encode(x[:10]), x[:10], k=10)
    assert not set(got2.ravel().tolist()) & set(ids[:5].tolist())
    np.testing.assert_array_equal(got2[:, 0], got[:, 0])
    loaded.add(ids[:2], head.encode(x[:2]), x[:2])  # a removed id may be added again
    got3, _ = loaded.search(head.encode(x[:2]), x[:2], k=1)
    assert got3[:, 0].tolist() == ids[:2].tolist()


def test_binary_index_bad_inputs(tmp_path):
    x = clustered_embeddings(n=10, dim=16)
    codes = np.packbits(x[:, :8] > 0, axis=1).repeat(8, axis=1)[:, :8]  # any (10, 8) uint8
    index = BinaryIndex(bits=64, dim=16, config=BinaryIndexConfig(kind="flat"))
    ids = np.arange(10)
    with pytest.raises(HashingError, match="codes must be uint8"):
        index.add(ids, codes.astype(np.int32), x)
    with pytest.raises(HashingError, match="dimension 15"):
        index.add(ids, codes, x[:, :15])
    index.add(ids, codes, x)
    with pytest.raises(HashingError, match="already in the index"):
        index.add(ids[:1], codes[:1], x[:1])
    with pytest.raises(HashingError, match="unknown ids"):
        index.remove([99])
    with pytest.raises(HashingError, match="integer"):
        index.remove(np.array([0.5]))
    with pytest.raises(HashingError, match="k must be"):
        index.search(codes[:1], x[:1], k=0)
    empty = BinaryIndex(bits=64, dim=16)
    got, _ = empty.search(codes[:1], x[:1], k=2)
    assert (got == -1).all()
    index.save(tmp_path / "i")
    (tmp_path / "i" / "binary.index").write_bytes(b"garbage")
    with pytest.raises(HashingError, match="cannot read"):
        BinaryIndex.load(tmp_path / "i")


# ------------------------------------------------------------------------------ fallback index
@pytest.fixture
def trained_fallback():
    item_ids, z, enc, train, test = synthetic_task(n_items=60)
    tower = QueryTower(config=QueryTowerConfig(**TOWER), text_encoder=enc, item_dim=z.shape[1])
    tower.fit(train, item_ids, z)
    head = HashHead(dim=z.shape[1], config=HashConfig(bits=64, steps=100, device="cpu"))
    head.fit(z)
    return item_ids, z, enc, tower, head, test


def test_fallback_index_add_search_remove_save_load(tmp_path, trained_fallback):
    item_ids, z, enc, tower, head, test = trained_fallback
    fb = FallbackIndex(tower=tower, head=head, config=BinaryIndexConfig(kind="hnsw", candidates=30))
    fb.add(item_ids[:40], z[:40])
    fb.add(item_ids[40:], z[40:])  # added later: searchable at once
    texts, targets = [t for _, t in test], [iid for iid, _ in test]
    res = fb.search(texts, k=5)
    assert all(len(r) == 5 for r in res)
    assert recall_at_k([[i for i, _ in r] for r in res], targets, 5) > 0.7
    new_hits = [r[0][0] == t for r, t in zip(res, targets) if int(t[4:]) >= 40]
    assert np.mean(new_hits) > 0.5

    gone = item_ids[40:50]
    fb.remove(gone)
    assert len(fb) == 50 and gone[0] not in fb
    res = fb.search(texts, k=50)
    assert not {i for r in res for i, _ in r} & set(gone)

    fb.save(tmp_path / "fb")
    loaded = FallbackIndex.load(tmp_path / "fb", text_encoder=enc)
    res2 = loaded.search(texts, k=50)
    assert not {i for r in res2 for i, _ in r} & set(gone)
    assert [r[0][0] for r in res2] == [r[0][0] for r in res]
    assert loaded.bytes_per_item() == {"code": 8, "float": 4 * z.shape[1]}


def test_fallback_train_from_config_overrides():
    item_ids, z, enc, train, test = synthetic_task(n_items=30, seed=2)
    cfg = load_config(FallbackConfig, None, ["tower.epochs=40", "tower.batch_size=32", "tower.lr=3e-3",
                                             "tower.device=cpu", "hash.bits=32", "hash.steps=50",
                                             "hash.device=cpu", "index.kind=flat"])
    assert cfg.hash.bits == 32 and cfg.index.kind == "flat"
    fb = FallbackIndex.train(config=cfg, pairs=train, item_ids=item_ids, item_embeddings=z, text_encoder=enc)
    assert len(fb) == 0 and fb.head.bits == 32
    fb.add(item_ids, z)
    res = fb.search([t for _, t in test], k=5)
    assert recall_at_k([[i for i, _ in r] for r in res], [iid for iid, _ in test], 5) > 0.7


def test_fallback_index_bad_inputs(trained_fallback):
    item_ids, z, enc, tower, head, _ = trained_fallback
    fb = FallbackIndex(tower=tower, head=head)
    fb.add(item_ids[:3], z[:3])
    with pytest.raises(FallbackError, match="already in the fallback index"):
        fb.add(item_ids[:1], z[:1])
    with pytest.raises(FallbackError, match="duplicate"):
        fb.add(["a", "a"], z[3:5])
    bad = z[3:4].copy()
    bad[0, 0] = np.nan
    with pytest.raises(FallbackError, match="NaN"):
        fb.add(["b"], bad)
    with pytest.raises(FallbackError, match="dimension"):
        fb.add(["b"], np.ones((1, 5), np.float32))
    with pytest.raises(FallbackError, match="2 item ids but 1"):
        fb.add(["b", "c"], z[3:4])
    with pytest.raises(FallbackError, match="not in the fallback index"):
        fb.remove(["zzz"])
    with pytest.raises(FallbackError, match="single string"):
        fb.search("one query")
    assert len(fb) == 3  # failed calls changed nothing
    with pytest.raises(FallbackError, match="hash head takes"):
        FallbackIndex(tower=tower, head=HashHead(dim=5, config=HashConfig(bits=8)))


# ------------------------------------------------------------------------------ calibration + merge
def test_fit_calibration_recovers_a_known_platt_mapping():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-(1.5 * s - 0.5)))
    cal = fit_calibration(s, y)
    assert abs(cal.a - 1.5) < 0.2 and abs(cal.b + 0.5) < 0.2
    assert cal(0.0) < cal(1.0)  # monotone in the score
    with pytest.raises(FallbackError, match="both correct and incorrect"):
        fit_calibration([0.1, 0.2], [True, True])
    with pytest.raises(FallbackError, match="NaN"):
        fit_calibration([0.1, np.nan], [True, False])


def test_calibration_samples_label_each_result():
    scores, ok = calibration_samples([[("a", 0.9), ("b", 0.5)], [("c", 0.7)]], ["b", "x"])
    assert scores.tolist() == [0.9, 0.5, 0.7] and ok.tolist() == [False, True, False]


def test_merge_rankings_hand_made():
    # generative log-probs: p = sigmoid(log p + 2); fallback cosines: p = sigmoid(10 * cos - 6)
    cal = Calibration(generative=PlattCalibration(1.0, 2.0), fallback=PlattCalibration(10.0, -6.0))
    gen = [("g1", -0.1), ("g2", -3.0), ("both", -4.0)]
    fb = [("f1", 0.9), ("both", 0.55), ("f2", 0.2)]
    merged = merge_rankings(gen, fb, cal)
    # calibrated: g1 .87, g2 .27, both(gen) .12, f1 .95, both(fb) .38, f2 .02
    assert [m.item_id for m in merged] == ["f1", "g1", "both", "g2", "f2"]
    assert [m.source for m in merged] == ["fallback", "generative", "fallback", "generative", "fallback"]
    assert merged[2].raw_score == 0.55
    assert all(a.score >= b.score for a, b in zip(merged, merged[1:]))
    assert [m.item_id for m in merge_rankings(gen, fb, cal, k=2)] == ["f1", "g1"]
    assert [m.source for m in merge_rankings(gen, [], cal)] == ["generative"] * 3
    with pytest.raises(FallbackError, match="NaN"):
        merge_rankings([("x", float("nan"))], [], cal)
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal


def test_cosine_scale_merge_ranks_both_sources_on_the_tower_cosine():
    # Raw scales disagree: the generative model is over-confident (log-prob -0.05 for a wrong item)
    # and its log-probs are not comparable with cosines. On the cosine scale each source's correct
    # item comes first, whichever source found it.
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.uniform(0.55, 0.95, 200), rng.uniform(0.1, 0.65, 800)])
    platt = fit_calibration(cos, np.arange(1000) < 200)
    assert platt.a > 0
    cal = Calibration(generative=platt, fallback=platt, scale="cosine")
    # an over-confident raw-score calibration (as fitted on the generative model's own training queries)
    raw = Calibration(generative=PlattCalibration(1.0, 3.0), fallback=PlattCalibration(10.0, -5.0))
    # an old item's query: the generative path is right (rank 1); new items only look similar
    gen, gen_cos = [("old/right", -2.5), ("old/other", -3.0)], [0.82, 0.41]
    fb = [("new/similar", 0.63), ("new/far", 0.30)]
    merged = merge_rankings(gen, fb, cal, generative_cosines=gen_cos)
    assert merged[0].item_id == "old/right" and merged[0].source == "generative" and merged[0].raw_score == -2.5
    assert [m.item_id for m in merged] == ["old/right", "new/similar", "old/other", "new/far"]
    assert merge_rankings(gen, fb, raw)[0].item_id == "new/similar"  # the raw-score merge gets this one wrong
    # a new item's query: the generative path (which cannot know it) is confidently wrong
    gen, gen_cos = [("old/wrong", -0.05), ("old/worse", -0.4)], [0.45, 0.30]
    fb = [("new/right", 0.78), ("new/other", 0.50)]
    merged = merge_rankings(gen, fb, cal, generative_cosines=gen_cos)
    assert merged[0].item_id == "new/right" and merged[0].source == "fallback"
    assert merge_rankings(gen, fb, raw)[0].item_id == "old/wrong"  # ... and this one
    assert [m.source for m in merge_rankings(gen, [], cal, generative_cosines=gen_cos, k=1)] == ["generative"]
    with pytest.raises(FallbackError, match="one tower cosine per generative result"):
        merge_rankings(gen, fb, cal)
    with pytest.raises(FallbackError, match="one tower cosine per generative result"):
        merge_rankings(gen, fb, cal, generative_cosines=[0.5])
    with pytest.raises(FallbackError, match="NaN"):
        merge_rankings(gen, fb, cal, generative_cosines=[0.5, float("nan")])
    assert Calibration.from_dict(cal.to_dict()) == cal
    old_file = {"generative": {"a": 1.0, "b": 0.0}, "fallback": {"a": 2.0, "b": 0.0}}  # written before "scale"
    assert Calibration.from_dict(old_file).scale == "raw"
    with pytest.raises(FallbackError, match="scale"):
        Calibration.from_dict({**old_file, "scale": "logits"})
