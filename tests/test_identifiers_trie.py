"""Prefix trie over identifiers: FlatTrie arrays and the mutable IdentifierTrie."""
import numpy as np
import pytest

from identifiers.trie import FlatTrie, IdentifierTrie, TrieError

LEVELS = (4, 3, 3, 5)


def random_codes(n, levels=LEVELS, seed=0):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, s, 4 * n) for s in levels], 1)
    codes = np.unique(codes, axis=0)
    rng.shuffle(codes)
    return codes[:n]


def prefix_children(codes):
    """Brute force: prefix tuple -> set of next codes."""
    out = {}
    for row in codes.tolist():
        for d in range(len(row)):
            out.setdefault(tuple(row[:d]), set()).add(row[d])
    return out


def test_flat_trie_matches_brute_force():
    codes = random_codes(60)
    flat = FlatTrie.from_codes(codes, LEVELS)
    L = len(LEVELS)
    assert flat.length == L and flat.level_sizes == LEVELS
    for arr in (flat.child_start, flat.child_count, flat.child_code, flat.child_node, flat.leaf_item):
        assert arr.dtype == np.int64
    # every node's child slice is sorted, and child depth = parent depth + 1
    depth = flat.node_depth
    assert depth[0] == 0
    for node in range(flat.num_nodes):
        s, c = flat.child_start[node], flat.child_count[node]
        cc = flat.child_code[s:s + c]
        assert np.all(np.diff(cc) > 0)
        assert np.all(depth[flat.child_node[s:s + c]] == depth[node] + 1)
        assert np.all(cc < LEVELS[depth[node]]) if c else True
        assert (flat.leaf_item[node] >= 0) == (depth[node] == L)
    # allowed_next equals the brute-force set for every present prefix
    for prefix, nxt in prefix_children(codes).items():
        assert flat.allowed_next(prefix).tolist() == sorted(nxt)
    # leaves map back to rows
    assert flat.lookup_rows(codes).tolist() == list(range(len(codes)))
    assert flat.num_items == len(codes)


def test_flat_trie_only_members_are_paths():
    codes = random_codes(40)
    flat = FlatTrie.from_codes(codes, LEVELS)
    members = {tuple(r) for r in codes.tolist()}
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in LEVELS], indexing="ij"), -1).reshape(-1, len(LEVELS))
    rows = flat.lookup_rows(grid)
    for code, row in zip(grid.tolist(), rows.tolist()):
        if tuple(code) in members:
            assert codes[row].tolist() == code
        else:
            assert row == -1
    assert flat.allowed_next([LEVELS[0] + 5]).size == 0       # absent prefix
    assert flat.allowed_next(codes[0]).size == 0              # complete identifier


def test_flat_trie_items_and_vectorised_child():
    codes = random_codes(30)
    items = np.arange(30) * 10
    flat = FlatTrie.from_codes(codes, LEVELS, items=items)
    assert flat.lookup_rows(codes).tolist() == items.tolist()
    node = np.zeros(len(codes), dtype=np.int64)
    for d in range(len(LEVELS)):
        node = flat.child(node, codes[:, d])
    assert (flat.leaf_item[node] == items).all()
    assert flat.child(np.array([0]), np.array([99])).tolist() == [-1]
    assert flat.child(np.array([-1]), np.array([0])).tolist() == [-1]


def test_flat_trie_bad_input():
    codes = random_codes(10)
    with pytest.raises(TrieError, match="duplicate identifier"):
        FlatTrie.from_codes(np.concatenate([codes, codes[3:4]]), LEVELS)
    bad = codes.copy()
    bad[2, 1] = LEVELS[1]
    with pytest.raises(TrieError, match="row 2 level 1"):
        FlatTrie.from_codes(bad, LEVELS)
    with pytest.raises(TrieError, match="2-D"):
        FlatTrie.from_codes(codes[0], LEVELS)
    with pytest.raises(TrieError, match="columns"):
        FlatTrie.from_codes(codes[:, :3], LEVELS)
    with pytest.raises(TrieError, match="integers"):
        FlatTrie.from_codes(codes.astype(float), LEVELS)


def test_flat_trie_empty_and_save_load(tmp_path):
    empty = FlatTrie.from_codes(np.zeros((0, 4), np.int64), LEVELS)
    assert empty.num_nodes == 1 and empty.allowed_next([]).size == 0
    codes = random_codes(25)
    flat = FlatTrie.from_codes(codes, LEVELS)
    flat.save(tmp_path / "t.npz")
    back = FlatTrie.load(tmp_path / "t.npz")
    assert (back.child_code == flat.child_code).all() and back.level_sizes == LEVELS
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(TrieError, match="cannot read"):
        FlatTrie.load(tmp_path / "bad.npz")


def test_identifier_trie_add_lookup_remove():
    codes = random_codes(50)
    ids = [f"item{i}" for i in range(50)]
    trie = IdentifierTrie.from_codes(codes[:30], ids[:30], LEVELS)
    for i in range(30, 50):                                   # one at a time (pending path)
        trie.add(codes[i], ids[i])
    assert len(trie) == 50 and trie.item_ids == ids
    assert all(trie.lookup(codes[i]) == ids[i] for i in range(50))
    for prefix, nxt in prefix_children(codes).items():
        assert trie.allowed_next(prefix).tolist() == sorted(nxt)
    flat = trie.flat()
    assert flat.lookup_rows(codes).tolist() == list(range(50))

    gone = ["item3", "item40"]
    trie.remove(gone)
    assert len(trie) == 48 and "item3" not in trie and "item4" in trie
    assert trie.lookup(codes[3]) is None and trie.lookup(codes[40]) is None
    keep = [i for i in range(50) if ids[i] not in gone]
    assert (trie.codes == codes[keep]).all()
    for prefix, nxt in prefix_children(codes[keep]).items():
        assert trie.allowed_next(prefix).tolist() == sorted(nxt)
    rows = trie.flat().lookup_rows(codes[keep])
    assert [trie.item_ids[r] for r in rows] == [ids[i] for i in keep]


def test_identifier_trie_rejects_duplicates_and_unknown():
    codes = random_codes(12)
    ids = [f"x{i}" for i in range(12)]
    trie = IdentifierTrie.from_codes(codes[:10], ids[:10], LEVELS)
    with pytest.raises(TrieError, match="already in the trie"):
        trie.add(codes[10], "x0")
    with pytest.raises(TrieError, match="already belongs to 'x2'"):
        trie.add(codes[2], "new")
    with pytest.raises(TrieError, match="duplicate item id 'y'"):
        trie.add(codes[10:12], ["y", "y"])
    with pytest.raises(TrieError, match="unknown item id 'nope'"):
        trie.remove(["nope"])
    with pytest.raises(TrieError, match="no next level"):
        trie.allowed_next(codes[0])
    with pytest.raises(TrieError, match="must be a str"):
        trie.add(codes[10], [7])
    assert len(trie) == 10                                    # failed adds change nothing


def test_identifier_trie_bulk_add_crosses_rebuild_threshold():
    levels = (16, 16, 16, 8)
    codes = random_codes(6000, levels, seed=1)
    ids = [str(i) for i in range(6000)]
    trie = IdentifierTrie.from_codes(codes[:100], ids[:100], levels)
    trie.add(codes[100:5000], ids[100:5000])
    for i in range(5000, 5010):
        trie.add(codes[i], ids[i])
    trie.add(codes[5010:], ids[5010:])
    assert trie.flat().lookup_rows(codes).tolist() == list(range(6000))
    assert trie.row_of("5005") == 5005 and trie.row_of("4999") == 4999


def test_identifier_trie_save_load(tmp_path):
    codes = random_codes(40)
    ids = [f"id-{i}" for i in range(40)]
    trie = IdentifierTrie.from_codes(codes, ids, LEVELS)
    trie.remove(["id-7"])
    trie.save(tmp_path / "trie")
    back = IdentifierTrie.load(tmp_path / "trie", LEVELS)
    assert back.item_ids == trie.item_ids
    assert (back.codes == trie.codes).all()
    assert back.lookup(codes[8]) == "id-8" and back.lookup(codes[7]) is None
    (tmp_path / "trie" / "item_id_rows.npy").write_bytes(b"garbage")
    with pytest.raises(TrieError, match="cannot read the identifier trie"):
        IdentifierTrie.load(tmp_path / "trie", LEVELS)
