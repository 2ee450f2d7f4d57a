"""Semantic identifiers (k, v1..vM, u): uniqueness, determinism, trie, assign/remove, save/load, bad input."""
import json

import numpy as np
import pytest
import torch

from identifiers import (FORMAT_VERSION, IdentifierConfig, IdentifierInputError, IdTable, IdTableError,
                         SemanticIdTokenizer, TokenizerFormatError, load_embeddings)
from identifiers.__main__ import main as cli_main

N, D = 300, 16


def tiny_config(**kw) -> IdentifierConfig:
    base = dict(K=8, M=2, codebook_size=8, max_u=64, hidden_dims=(32, 16), latent_dim=8,
                rqvae_max_steps=60, rqvae_batch_size=64, kmeans_batch_size=128, kmeans_n_init=1,
                codebook_kmeans_iters=5, encode_batch_size=100, num_threads=1, seed=0)
    base.update(kw)
    return IdentifierConfig(**base)


def mixture(n=N, d=D, seed=0, components=12):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(components, d))
    x = means[rng.integers(0, components, n)] + 0.4 * rng.normal(size=(n, d))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return mixture(), [f"item{i}" for i in range(N)]


@pytest.fixture(scope="module")
def fitted(data):
    x, ids = data
    return SemanticIdTokenizer.fit(x, ids, tiny_config(), device="cpu", progress=False)


def fresh(data):
    x, ids = data
    return SemanticIdTokenizer.fit(x, ids, tiny_config(), device="cpu", progress=False)


def test_identifiers_unique_well_formed(fitted, data):
    tok = fitted
    codes = tok.codes
    assert codes.shape == (N, 4) and codes.dtype == np.int64
    assert tok.level_sizes == [8, 8, 8, 64]
    assert np.unique(codes, axis=0).shape[0] == N                        # unique
    assert ((codes >= 0) & (codes < np.array(tok.level_sizes))).all()
    assert tok.item_ids == data[1]
    assert tok.centroids.shape == (8, D)
    assert len(tok.codebooks) == 2 and tok.codebooks[0].shape == (8, 8)


def test_u_is_search_and_count_in_input_order(fitted):
    seen = {}
    for row in fitted.codes.tolist():
        prefix = tuple(row[:-1])
        assert row[-1] == seen.get(prefix, 0)
        seen[prefix] = row[-1] + 1


def test_k_is_nearest_centroid_of_normalised_embedding(fitted, data):
    xn = data[0] / np.linalg.norm(data[0], axis=1, keepdims=True)
    dist = ((xn[:, None, :] - fitted.centroids[None]) ** 2).sum(-1)
    assert (fitted.codes[:, 0] == dist.argmin(1)).all()


def test_determinism_with_seed(fitted, data):
    again = fresh(data)
    assert np.array_equal(again.codes, fitted.codes)
    assert np.allclose(again.centroids, fitted.centroids)


def test_every_identifier_is_a_trie_path_and_only_those(fitted):
    codes = fitted.codes
    flat = fitted.trie.flat()
    assert flat.lookup_rows(codes).tolist() == list(range(N))
    # enumerate all leaves of the flat trie: exactly the identifiers
    leaves = set()
    stack = [(0, ())]
    while stack:
        node, path = stack.pop()
        if len(path) == flat.length:
            leaves.add(path)
            assert codes[flat.leaf_item[node]].tolist() == list(path)
            continue
        kids_code, kids_node = flat.children(node)
        stack.extend((int(n), path + (int(c),)) for c, n in zip(kids_code, kids_node))
    assert leaves == {tuple(r) for r in codes.tolist()}
    # allowed_next from the tokenizer's trie agrees with the identifiers
    for row in codes[:20].tolist():
        for d in range(4):
            nxt = fitted.trie.allowed_next(row[:d])
            expect = sorted({r[d] for r in codes.tolist() if r[:d] == row[:d]})
            assert nxt.tolist() == expect
    missing = codes[0].copy()
    missing[-1] = 63
    assert fitted.lookup(missing) is None
    assert fitted.lookup(codes[5]) == "item5"


def test_assign_keeps_old_rows_and_gives_unique_new(data):
    tok = fresh(data)
    old = tok.codes.copy()
    new_x = np.concatenate([data[0][:10], mixture(20, seed=3)])          # 10 exact copies of old items
    new_ids = [f"new{i}" for i in range(30)]
    codes = tok.assign(new_x, new_ids)
    assert codes.shape == (30, 4)
    assert np.array_equal(tok.codes[:N], old)                            # old rows unchanged
    assert np.unique(tok.codes, axis=0).shape[0] == N + 30               # all unique
    assert (codes[:10, :3] == old[:10, :3]).all()                        # copies share the prefix...
    assert (codes[:10, 3] > old[:10, 3]).all()                           # ...and get a later u
    for i, item in enumerate(new_ids):
        assert tok.lookup(codes[i]) == item
    assert tok.trie.flat().lookup_rows(codes).tolist() == list(range(N, N + 30))
    with pytest.raises(IdentifierInputError, match="already have identifiers"):
        tok.assign(new_x[:1], ["item0"])
    with pytest.raises(IdentifierInputError, match="dimension 5"):
        tok.assign(np.ones((2, 5), np.float32), ["a", "b"])
    assert len(tok) == N + 30                                            # failed assigns change nothing


def test_remove_and_never_reuse(data):
    tok = fresh(data)
    gone = tok.codes_of(["item3", "item4"]).copy()
    tok.remove(["item3", "item4"])
    assert len(tok) == N - 2 and "item3" not in tok.item_ids
    assert tok.lookup(gone[0]) is None and tok.lookup(gone[1]) is None
    flat = tok.trie.flat()
    assert (flat.lookup_rows(gone) == -1).all()
    assert flat.lookup_rows(tok.codes).tolist() == list(range(N - 2))
    again = tok.assign(data[0][3:4], ["item3-again"])                     # same embedding, new id
    assert again[0, :3].tolist() == gone[0, :3].tolist()
    assert again[0, 3] != gone[0, 3]                                     # u is not handed out twice
    with pytest.raises(ValueError, match="unknown item id 'item3'"):
        tok.remove(["item3"])


def test_save_load_round_trip(tmp_path, data):
    tok = fresh(data)
    tok.remove(["item7"])
    tok.save(tmp_path / "ids")
    back = SemanticIdTokenizer.load(tmp_path / "ids", device="cpu")
    assert np.array_equal(back.codes, tok.codes) and back.item_ids == tok.item_ids
    assert np.array_equal(back.centroids, tok.centroids)
    assert all(np.array_equal(a, b) for a, b in zip(back.codebooks, tok.codebooks))
    assert back.config == tok.config
    probe = mixture(40, seed=9)
    assert np.array_equal(back.encode_prefixes(probe), tok.encode_prefixes(probe))
    ids = [f"p{i}" for i in range(40)]
    assert np.array_equal(back.assign(probe, ids), tok.assign(probe, ids))   # same ID-table state
    assert np.array_equal(back.trie.flat().child_code, tok.trie.flat().child_code)


def test_load_rejects_other_version_and_corrupt_files(tmp_path, fitted):
    folder = fitted.save(tmp_path / "ids")
    meta = json.loads((folder / "format.json").read_text())
    meta["version"] = FORMAT_VERSION + 1
    (folder / "format.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerFormatError, match=f"version {FORMAT_VERSION + 1}"):
        SemanticIdTokenizer.load(folder)
    fitted.save(folder)
    raw = bytearray((folder / "centroids.npy").read_bytes())
    raw[-3] ^= 0xFF
    (folder / "centroids.npy").write_bytes(bytes(raw))
    with pytest.raises(TokenizerFormatError, match="centroids.npy is corrupt"):
        SemanticIdTokenizer.load(folder)
    fitted.save(folder)
    (folder / "trie" / "codes.npy").unlink()
    with pytest.raises(TokenizerFormatError, match="missing trie/codes.npy"):
        SemanticIdTokenizer.load(folder)
    (folder / "format.json").write_text("{not json")
    with pytest.raises(TokenizerFormatError, match="format.json is corrupt"):
        SemanticIdTokenizer.load(folder)
    with pytest.raises(TokenizerFormatError, match="not found"):
        SemanticIdTokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerFormatError, match="no format.json"):
        SemanticIdTokenizer.load(tmp_path / "empty")


@pytest.mark.parametrize("make, match", [
    (lambda x: np.where(np.arange(N)[:, None] == 17, np.nan, x), r"NaN or inf in row\(s\) 17"),
    (lambda x: np.where(np.isin(np.arange(N), [2, 40])[:, None], np.inf, x), r"row\(s\) 2, 40"),
    (lambda x: (x * 100).astype(np.int64), "floating point"),
    (lambda x: x[0], "2-D"),
    (lambda x: x[:0], "empty"),
    (lambda x: np.where(np.arange(N)[:, None] == 5, 0.0, x).astype(np.float32), "all-zero row"),
    (lambda x: [[1.0, 2.0]] * N, "numpy array or torch tensor"),
])
def test_fit_rejects_bad_embeddings(data, make, match):
    x, ids = data
    bad = make(x.copy())
    n = len(bad) if hasattr(bad, "__len__") and np.ndim(bad) > 1 else N
    with pytest.raises(IdentifierInputError, match=match):
        SemanticIdTokenizer.fit(bad, ids[:n] if n else [], tiny_config(), progress=False)


def test_fit_rejects_bad_ids_and_too_few_items(data):
    x, ids = data
    with pytest.raises(IdentifierInputError, match="duplicate item id 'item1' at rows 1 and 9"):
        SemanticIdTokenizer.fit(x, ids[:9] + ["item1"] + ids[10:], tiny_config(), progress=False)
    with pytest.raises(IdentifierInputError, match="300 embeddings but 299 item ids"):
        SemanticIdTokenizer.fit(x, ids[:-1], tiny_config(), progress=False)
    with pytest.raises(IdentifierInputError, match="K=8 .* N=5"):
        SemanticIdTokenizer.fit(x[:5], ids[:5], tiny_config(), progress=False)
    with pytest.raises(IdentifierInputError, match="must be a str"):
        SemanticIdTokenizer.fit(x, list(range(N)), tiny_config(), progress=False)


def test_torch_and_float64_input_accepted(data, fitted):
    x, ids = data
    tok = SemanticIdTokenizer.fit(torch.from_numpy(x).double(), ids, tiny_config(), progress=False)
    assert np.array_equal(tok.codes, fitted.codes)


def test_id_table_counts_on_and_overflows_cleanly():
    table = IdTable(prefix_sizes=(4, 3), max_u=3)
    assert table.assign(np.array([[0, 1], [2, 2], [0, 1]])).tolist() == [0, 0, 1]
    assert table.assign(np.array([[0, 1], [1, 0]])).tolist() == [2, 0]
    with pytest.raises(IdTableError, match=r"prefix \[0, 1\] needs u = 3 .* max_u = 3"):
        table.assign(np.array([[0, 1]]))
    assert table.assign(np.array([[2, 2]])).tolist() == [1]             # failed call changed nothing
    with pytest.raises(IdTableError, match="out of range"):
        table.assign(np.array([[4, 0]]))


def test_load_embeddings_formats_and_errors(tmp_path):
    x = mixture(20)
    np.save(tmp_path / "e.npy", x)
    emb, ids = load_embeddings(tmp_path / "e.npy")
    assert np.array_equal(np.asarray(emb), x) and ids is None
    torch.save({"embeddings": torch.from_numpy(x), "item_ids": [f"a{i}" for i in range(20)]}, tmp_path / "e.pt")
    emb, ids = load_embeddings(tmp_path / "e.pt")
    assert ids[3] == "a3" and tuple(emb.shape) == (20, D)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"item_id": [f"b{i}" for i in range(20)], "embedding": x.tolist()}),
                   tmp_path / "e.parquet")
    emb, ids = load_embeddings(tmp_path / "e.parquet")
    assert np.allclose(emb, x) and ids[0] == "b0"
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(IdentifierInputError, match="empty"):
        load_embeddings(tmp_path / "empty.npy")
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "e.npy").read_bytes()[:100])
    with pytest.raises(IdentifierInputError, match="cannot read embeddings"):
        load_embeddings(tmp_path / "trunc.npy")
    with pytest.raises(IdentifierInputError, match="not found"):
        load_embeddings(tmp_path / "missing.npy")
    (tmp_path / "e.csv").write_text("1,2\n")
    with pytest.raises(IdentifierInputError, match="unsupported"):
        load_embeddings(tmp_path / "e.csv")


def test_cli_build_and_errors(tmp_path, capsys, data):
    np.save(tmp_path / "e.npy", data[0])
    overrides = [f"{k}={v}" for k, v in dict(K=8, codebook_size=8, max_u=64, latent_dim=8,
                                                rqvae_max_steps=30, rqvae_batch_size=64,
                                                kmeans_batch_size=128, kmeans_n_init=1,
                                                num_threads=1).items()] + ["hidden_dims=[32,16]"]
    rc = cli_main(["build", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "out"),
                   "--quiet", "--json", str(tmp_path / "s.json"), *overrides])
    out = capsys.readouterr().out
    assert rc == 0 and "collision rate" in out and "codebook usage v2" in out and "max u" in out
    tok = SemanticIdTokenizer.load(tmp_path / "out")
    assert len(tok) == N and tok.item_ids[:2] == ["0", "1"]
    assert json.loads((tmp_path / "s.json").read_text())["N"] == N
    bad = data[0].copy()
    bad[11] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    rc = cli_main(["build", "--embeddings", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o2"),
                   "--quiet", *overrides])
    assert rc == 2 and "row(s) 11" in capsys.readouterr().err
    rc = cli_main(["build", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "o3"), "Kx=3"])
    assert rc == 2 and "unknown config key" in capsys.readouterr().err


def test_level_vectors_initialise_the_identifier_embeddings(fitted):
    import torch

    from ace.model.config import AceConfig
    from ace.model.modeling import AceModel

    vecs = fitted.level_vectors
    assert [None if v is None else v.shape[0] for v in vecs] == fitted.level_sizes[:-1] + [None]
    assert vecs[0] is fitted.centroids and vecs[-1] is None
    torch.manual_seed(0)
    K = fitted.level_sizes[0]
    model = AceModel(AceConfig(d_model=K, n_heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=32,
                               query_vocab_size=20, max_query_length=8, level_sizes=fitted.level_sizes))
    before = model.decoder.embed.weight.detach().clone()
    model.init_identifier_embeddings(vecs)
    after = model.decoder.embed.weight.detach()
    k_rows = slice(3, 3 + K)  # after the 3 special tokens
    # the K-Means tokens now have the centroids' geometry (PCA of the centred centroids); u rows untouched
    c = fitted.centroids - fitted.centroids.mean(0)
    e = after[k_rows].numpy()
    b = before[k_rows].numpy()
    off = ~np.eye(K, dtype=bool)

    def cos(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return (a @ a.T)[off]

    def corr(m):  # correlation of the off-diagonal cosine similarities with the centroids'
        return np.corrcoef(cos(c), cos(m))[0, 1]

    assert corr(e) > 0.99 and corr(b) < 0.6, (corr(e), corr(b))  # d_model = K: the PCA keeps every direction
    u_rows = slice(after.shape[0] - fitted.level_sizes[-1], after.shape[0])
    assert torch.equal(after[u_rows], before[u_rows])


def test_level_vectors_without_the_kmeans_token(data):
    x, ids = data
    tok = SemanticIdTokenizer.fit(x, ids, tiny_config(use_kmeans=False), device="cpu", progress=False)
    assert tok.level_vectors[0] is None and len(tok.level_vectors) == len(tok.level_sizes)
