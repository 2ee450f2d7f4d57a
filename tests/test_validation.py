"""The validation layer (ace/validation.py) that HTTP, the items CLI and the Retriever share, and the
identifier trie's refusal of item ids it cannot index (issue 18)."""
import re

import pytest

from ace.validation import InputError, check_item_fields, check_item_id, check_metadata, check_query


@pytest.mark.parametrize("value, field, problem", [
    ("a\0b", "item_id", "U+0000"),
    ("a\nb", "item_id", "U+000A"),
    ("\x7f", "item_id", "U+007F"),
    ("\ud800", "item_id", "lone surrogate"),
    ("  ", "item_id", "empty"),
    ("x" * 513, "item_id", "limit is 512"),
    (7, "item_id", "must be a string"),
])
def test_item_ids_are_checked_and_the_error_names_the_field(value, field, problem):
    with pytest.raises(InputError) as err:
        check_item_id(value)
    assert err.value.field == field and problem in str(err.value)


def test_item_fields_queries_and_metadata():
    check_item_fields("new/1", media="a b/c.png", captions=["line one\nline two\tok"], metadata={"a": [1, 2.5, None]})
    cases = [
        (dict(captions=["ok", "\udfff"]), "items.3.captions.1", "lone surrogate"),
        (dict(captions=["nul \0"]), "items.3.captions.0", "U+0000"),
        (dict(captions="one string"), "items.3.captions", "list of strings"),
        (dict(media="a\0.png"), "items.3.media", "U+0000"),
        (dict(metadata={"k": float("nan")}), "items.3.metadata.k", "finite"),
        (dict(metadata={"k": {"deep": ["\ud800"]}}), "items.3.metadata.k.deep.0", "lone surrogate"),
        (dict(metadata={"k": object()}), "items.3.metadata.k", "JSON value"),
        (dict(metadata=[1]), "items.3.metadata", "JSON object"),
    ]
    for kwargs, field, problem in cases:
        with pytest.raises(InputError) as err:
            check_item_fields("ok", prefix="items.3", **kwargs)
        assert err.value.field == field and problem in str(err.value), (kwargs, str(err.value))
    deep: dict = {}
    node = deep
    for _ in range(20):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(InputError, match="deeper"):
        check_metadata(deep)
    with pytest.raises(InputError, match="bytes as JSON"):
        check_metadata({f"k{i}": "x" * 1000 for i in range(70)})
    assert check_query("  a dog  ") == "  a dog  "
    for bad, problem in [("\ud800", "lone surrogate"), ("   ", "empty"), ("a\0", "U+0000"), ("x" * 600, "limit")]:
        with pytest.raises(InputError, match=re.escape(problem)):
            check_query(bad)


def test_the_identifier_trie_refuses_ids_it_cannot_index():
    from identifiers.trie import IdentifierTrie, TrieError

    trie = IdentifierTrie(level_sizes=[4, 4])
    trie.add([[0, 0]], ["fine"])
    for bad in ["a\0b", "\ud800"]:
        with pytest.raises(TrieError, match="position 0"):
            trie.add([[1, 1]], [bad])
    assert trie.item_ids == ["fine"] and trie.lookup([1, 1]) is None
    trie.add([[1, 1]], ["ok"])
    trie.remove(["fine"])
    assert trie.row_of("ok") == 0
