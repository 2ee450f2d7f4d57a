"""Identifier ablations: hierarchical K-Means v1..vM (quantizer=kmeans) and no K-Means token (use_kmeans=False)."""
import numpy as np
import pytest

from identifiers import IdentifierConfig, SemanticIdTokenizer, TokenizerFormatError
from identifiers.hierarchical_kmeans import HierarchicalKMeans

N, D = 200, 12


def tiny_config(**kw) -> IdentifierConfig:
    base = dict(K=6, M=2, codebook_size=6, max_u=64, hidden_dims=(24,), latent_dim=8, rqvae_max_steps=40,
                rqvae_batch_size=64, kmeans_batch_size=128, kmeans_n_init=1, kmeans_max_iter=50,
                codebook_kmeans_iters=5, encode_batch_size=64, num_threads=1, seed=0)
    base.update(kw)
    return IdentifierConfig(**base)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(10, D))
    x = (means[rng.integers(0, 10, N)] + 0.3 * rng.normal(size=(N, D))).astype(np.float32)
    return x, [f"it{i}" for i in range(N)]


@pytest.fixture(scope="module")
def hk_tok(data):
    return SemanticIdTokenizer.fit(*data, tiny_config(quantizer="kmeans"), device="cpu", progress=False)


def test_hierarchical_kmeans_by_hand():
    # two parents; parent 0 has 5 members (split into C=2), parent 1 has 2 members (one code each)
    r = np.array([[0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [9, 9], [-9, -9]], dtype=np.float32)
    k = np.array([0, 0, 0, 0, 0, 1, 1])
    hk = HierarchicalKMeans(M=1, codebook_size=2, n_init=1).fit(r, k)
    codes = hk.encode(r, k)[:, 0]
    assert len(set(codes[:3])) == 1 and len(set(codes[3:5])) == 1 and codes[0] != codes[3]   # the two blobs
    assert sorted(codes[5:].tolist()) == [0, 1]                                                # own codes
    assert hk.offsets[0].tolist() == [0, 2, 4] and hk.parents[0].tolist() == [[0], [1]]
    np.testing.assert_allclose(hk.reconstruct(r[5:], k[5:]), r[5:])      # a singleton child is the member
    # an unseen parent (k=7) gets code 0, not an error
    assert hk.encode(np.zeros((1, 2), np.float32), np.array([7])).tolist() == [[0]]
    # codebooks: per level (C, D) mean step from parent to child
    cb = hk.codebooks
    assert len(cb) == 1 and cb[0].shape == (2, 2) and np.isfinite(cb[0]).all()


def test_kmeans_quantizer_identifiers_unique_and_hierarchical(hk_tok, data):
    codes = hk_tok.codes
    assert codes.shape == (N, 4) and hk_tok.level_sizes == [6, 6, 6, 64]
    assert np.unique(codes, axis=0).shape[0] == N
    assert ((codes >= 0) & (codes < np.array(hk_tok.level_sizes))).all()
    assert hk_tok.rqvae is None and hk_tok.hkmeans is not None
    # nodes never have more than C children, and level-2 parents are (k, v1) prefixes that occur
    for m in range(2):
        assert (np.diff(hk_tok.hkmeans.offsets[m]) <= 6).all()
    occurring = {tuple(p) for p in codes[:, :2].tolist()}
    assert {tuple(p) for p in hk_tok.hkmeans.parents[1].tolist()} == occurring
    assert [c.shape for c in hk_tok.codebooks] == [(6, D), (6, D)]
    assert hk_tok.summary()["recon_error"]["relative"] < 1.0


def test_kmeans_quantizer_assign_and_save_load(tmp_path, data):
    x, ids = data
    tok = SemanticIdTokenizer.fit(x[:150], ids[:150], tiny_config(quantizer="kmeans"), device="cpu", progress=False)
    before = tok.codes.copy()
    new = tok.assign(x[150:], ids[150:])
    assert new.shape == (50, 4) and np.array_equal(tok.codes[:150], before)
    assert np.unique(tok.codes, axis=0).shape[0] == N
    # the same embedding as a fitted item falls into that item's (k, v1, v2) node
    again = tok.encode_prefixes(x[:150])
    assert np.array_equal(again, before[:, :3])
    tok.save(tmp_path / "ids")
    assert (tmp_path / "ids" / "hkmeans.npz").is_file() and not (tmp_path / "ids" / "rqvae.safetensors").exists()
    back = SemanticIdTokenizer.load(tmp_path / "ids", device="cpu")
    assert back.config.quantizer == "kmeans" and np.array_equal(back.codes, tok.codes)
    assert np.array_equal(back.encode_prefixes(x[150:]), new[:, :3])
    assert back.trie.lookup(tuple(new[0])) == ids[150]
    # a corrupt tree file is named
    np.savez(tmp_path / "ids" / "hkmeans.npz", shape=np.array([2, 6]))
    with pytest.raises(TokenizerFormatError, match="hkmeans.npz"):
        SemanticIdTokenizer.load(tmp_path / "ids")


@pytest.mark.parametrize("quantizer", ["rqvae", "kmeans"])
def test_no_kmeans_token_is_one_constant_code(tmp_path, data, quantizer):
    x, ids = data
    cfg = tiny_config(use_kmeans=False, quantizer=quantizer, K=64)   # K is ignored without K-Means
    tok = SemanticIdTokenizer.fit(x, ids, cfg, device="cpu", progress=False)
    codes = tok.codes
    assert tok.level_sizes == [1, 6, 6, 64] and codes.shape == (N, 4)
    assert (codes[:, 0] == 0).all() and np.unique(codes, axis=0).shape[0] == N
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(tok.centroids, xn.mean(0, keepdims=True), atol=1e-5)
    assert tok.trie.flat().child_count[0] == 1                         # one choice at the first step
    new = tok.assign(x[:3] + 0.01, ["n0", "n1", "n2"])
    assert (new[:, 0] == 0).all()
    tok.save(tmp_path / "ids")
    back = SemanticIdTokenizer.load(tmp_path / "ids", device="cpu")
    assert back.level_sizes == [1, 6, 6, 64] and np.array_equal(back.codes, tok.codes)


def test_bad_quantizer_and_mismatched_models(data):
    with pytest.raises(ValueError, match="quantizer"):
        tiny_config(quantizer="pq")
    tok = SemanticIdTokenizer.fit(*data, tiny_config(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="quantizer"):
        SemanticIdTokenizer(config=tiny_config(quantizer="kmeans"), centroids=tok.centroids, rqvae=tok.rqvae,
                            table=tok.table, trie=tok.trie)
