"""The one validation layer for what users send: item ids, captions, metadata, media paths and queries.

HTTP (``ace/server.py``), the items CLI and ``Retriever.add_items`` / ``search`` all call these, so a
value that one of them accepts can be stored, indexed, served as JSON and loaded again by every other:

- text is well-formed Unicode (no lone surrogates: they cannot be encoded as UTF-8, neither into the
  identifier trie, nor SQLite, nor a JSON response);
- item ids hold no control characters at all (NUL and friends break the id trie and URLs) and are
  at most ``MAX_ITEM_ID_CHARS`` long; captions, queries and media paths hold no control characters
  other than tab, newline and carriage return (metadata strings may: they stay escaped JSON);
- metadata is a JSON object of plain JSON values (finite numbers), at most ``MAX_METADATA_DEPTH``
  deep and ``MAX_METADATA_BYTES`` as JSON;
- sizes are bounded (``MAX_CAPTIONS`` captions of at most ``MAX_CAPTION_CHARS`` each).

Every failure is an ``InputError`` (a ``ValueError``) whose ``field`` names the offending value the way
a client sent it (``item_id``, ``items.2.captions.0``, ``metadata.tags.1``, ``query``).
Nothing here imports the rest of ``ace``: any layer may use it.
"""
from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

MAX_ITEM_ID_CHARS = 512
MAX_CAPTIONS = 1000
MAX_CAPTION_CHARS = 4000
MAX_MEDIA_PATH_CHARS = 4096
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 16
MAX_QUERY_CHARS = 512           # the server's ServeConfig.max_query_chars defaults to the same
TEXT_WHITESPACE = frozenset("\t\n\r")
# the same rules as JSON Schema patterns (ECMA-262), for the published OpenAPI schema
_CC = "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f"        # control characters but \t \n \r
TEXT_PATTERN = f"^[^{_CC}]*$"                                   # captions, media paths
QUERY_PATTERN = f"^[^{_CC}]*[^\\s{_CC}][^{_CC}]*$"                # ... and not blank
ITEM_ID_PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"


class InputError(ValueError):
    """A user-supplied value that cannot be accepted; ``field`` names it, the message says why."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field}: {problem}" if field else problem)


def _join(prefix: str, name: str | int) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X}" + (f" ({unicodedata.name(ch)})" if unicodedata.name(ch, "") else "")


def check_text(value: Any, field: str, *, max_chars: int, allow_whitespace_controls: bool = True,
               allow_empty: bool = True, allow_controls: bool = False) -> str:
    """``value`` is a str, well-formed Unicode, free of control characters, at most ``max_chars`` long.

    ``allow_whitespace_controls``: tab, newline and carriage return are allowed (not in ids);
    ``allow_controls``: any control character is (metadata values, stored and sent as escaped JSON).
    Returns ``value`` unchanged.
    """
    if not isinstance(value, str):
        raise InputError(field, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(field, "must not be empty")
    if len(value) > max_chars:
        raise InputError(field, f"{len(value)} characters, the limit is {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(field, f"not well-formed Unicode: lone surrogate {_describe(value[exc.start])} at "
                                f"position {exc.start}") from None
    for pos, ch in enumerate(value):
        if allow_controls:
            break
        if unicodedata.category(ch) == "Cc" and not (allow_whitespace_controls and ch in TEXT_WHITESPACE):
            raise InputError(field, f"control character {_describe(ch)} at position {pos} is not allowed")
    return value


def check_item_id(value: Any, field: str = "item_id") -> str:
    """A new item id: a non-empty string without control characters, at most MAX_ITEM_ID_CHARS."""
    return check_text(value, field, max_chars=MAX_ITEM_ID_CHARS, allow_whitespace_controls=False, allow_empty=False)


def check_query(value: Any, field: str = "query", *, max_chars: int = MAX_QUERY_CHARS) -> str:
    """A search query: non-empty after stripping, well-formed, no control characters but whitespace."""
    return check_text(value, field, max_chars=max_chars, allow_empty=False)


def check_captions(captions: Any, field: str = "captions") -> list[str]:
    if not isinstance(captions, (list, tuple)):
        raise InputError(field, f"must be a list of strings, got {type(captions).__name__}")
    if len(captions) > MAX_CAPTIONS:
        raise InputError(field, f"{len(captions)} captions, the limit is {MAX_CAPTIONS}")
    for n, c in enumerate(captions):
        check_text(c, _join(field, n), max_chars=MAX_CAPTION_CHARS)
    return list(captions)


def check_media_path(value: Any, field: str = "media") -> str | None:
    if value is None:
        return None
    return check_text(value, field, max_chars=MAX_MEDIA_PATH_CHARS, allow_whitespace_controls=False,
                      allow_empty=False)


def _check_json_value(value: Any, field: str, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise InputError(field, f"nested deeper than {MAX_METADATA_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        check_text(value, field, max_chars=MAX_METADATA_BYTES, allow_controls=True)
    elif isinstance(value, int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(field, f"{value} is not a finite number (JSON has no NaN or Infinity)")
    elif isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                raise InputError(field, f"keys must be strings, got {type(key).__name__} {key!r}")
            check_text(key, _join(field, "<key>"), max_chars=MAX_ITEM_ID_CHARS, allow_controls=True)
            _check_json_value(v, _join(field, key), depth + 1)
    elif isinstance(value, (list, tuple)):
        for n, v in enumerate(value):
            _check_json_value(v, _join(field, n), depth + 1)
    else:
        raise InputError(field, f"must be a JSON value (string, number, bool, null, list or object), "
                                f"got {type(value).__name__}")


def check_metadata(metadata: Any, field: str = "metadata") -> dict:
    """A JSON object of plain, well-formed JSON values, at most MAX_METADATA_BYTES when encoded."""
    if not isinstance(metadata, dict):
        raise InputError(field, f"must be a JSON object, got {type(metadata).__name__}")
    _check_json_value(metadata, field, 1)
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InputError(field, f"{size} bytes as JSON, the limit is {MAX_METADATA_BYTES}")
    return metadata


def check_item_fields(item_id: Any, *, media: Any = None, captions: Any = (), metadata: Any = None,
                      prefix: str = "") -> None:
    """Every user-supplied text field of one new item (the modality and embedding are checked by their owners)."""
    check_item_id(item_id, _join(prefix, "item_id"))
    check_media_path(media, _join(prefix, "media"))
    check_captions(captions, _join(prefix, "captions"))
    check_metadata({} if metadata is None else metadata, _join(prefix, "metadata"))

