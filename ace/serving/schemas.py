"""The HTTP API's data shapes (pydantic models: they make the published OpenAPI schema) and the item
JSON schema shared by ``POST /items`` and the items CLI (``items_from_json``)."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from ace.data.corpus import CorpusItem
from ace.validation import (ITEM_ID_PATTERN, MAX_CAPTION_CHARS, MAX_CAPTIONS, MAX_ITEM_ID_CHARS, MAX_MEDIA_PATH_CHARS,
                            QUERY_PATTERN, TEXT_PATTERN, InputError, check_item_fields)

Modality = Literal["image", "audio", "video", "text"]


class SearchRequest(BaseModel):
    """A text query; k, modality filter and beam width are optional."""
    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description="text query (non-empty, at most max_query_chars characters)")
    k: StrictInt | None = Field(None, ge=1, le=100, description="results to return (default: config default_k = 10)")
    modality: Modality | None = Field(None, description="only items of this modality")
    beams: StrictInt | None = Field(None, ge=1, description="beam width of the constrained beam search (default: the run's)")
    mode: Literal["auto", "hybrid", "merged", "generative", "fallback"] | None = Field(
        None, description="how results are found and scored (Retriever.search): auto = hybrid when the run has "
                          "RUN/hybrid, else merged")


class SearchResult(BaseModel):
    item_id: str
    modality: str
    score: float | None = Field(description="the retriever's score (generative: sequence log-probability); null if not finite")
    identifier: list[int] = Field(description="semantic identifier (k, v1..vM, u)")
    source: str = Field(description="'generative', 'fallback' or 'dense' (hybrid mode: a trained item nearest the query vector, scored by the same fused score): the path that found the item")
    mode: str | None = Field(None, description="the search mode that produced `score`: hybrid (log-prob + w * cosine), "
                                               "merged (calibrated probability), generative (log-prob), fallback (cosine)")
    raw_score: float | None = Field(None, description="the path's own score (hybrid: the identifier log-prob)")
    cosine: float | None = Field(None, description="hybrid: cosine(query vector, item vector) inside `score`")
    media_url: str | None
    poster_url: str | None = Field(None, description="a still frame of a video item (GET /poster/{item_id}); null otherwise")
    captions: list[str] = Field(description="the item's first captions (config result_captions; all via GET /items/{item_id})")


class SearchResponse(BaseModel):
    query: str
    k: int
    modality: str | None
    results: list[SearchResult]
    latency_ms: float


class ItemResponse(BaseModel):
    item_id: str
    modality: str
    media_url: str | None
    poster_url: str | None = None
    captions: list[str]
    metadata: dict[str, Any]
    has_embedding: bool


class NewItem(BaseModel):
    """An item to add: an embedding (the run's dimension) or a media path inside the corpus root."""
    model_config = ConfigDict(extra="forbid")
    item_id: StrictStr = Field(min_length=1, max_length=MAX_ITEM_ID_CHARS, json_schema_extra={"pattern": ITEM_ID_PATTERN},
                               description="new, never used before in this run; no control characters")
    modality: Modality
    embedding: list[float] | None = Field(None, description="item embedding; else the run's encoder reads `media`")
    media: StrictStr | None = Field(None, min_length=1, max_length=MAX_MEDIA_PATH_CHARS, json_schema_extra={"pattern": QUERY_PATTERN},
                                    description="media file path, relative to the corpus root (or absolute inside it)")
    captions: list[StrictStr] = Field(default_factory=list, max_length=MAX_CAPTIONS,
                                      json_schema_extra={"items": {"type": "string", "maxLength": MAX_CAPTION_CHARS,
                                                                   "pattern": TEXT_PATTERN}})
    metadata: dict[str, Any] = Field(default_factory=dict)


class AddItemsRequest(BaseModel):
    """A batch of items, added in one transaction (all or none)."""
    model_config = ConfigDict(extra="forbid")
    items: list[NewItem]


class AddedItem(BaseModel):
    item_id: str
    identifier: list[int]
    source: str


class AddItemsResponse(BaseModel):
    added: int
    items: list[AddedItem]


_ITEM, _ITEMS = TypeAdapter(NewItem), TypeAdapter(list[NewItem])


def _pydantic_message(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{prefix}{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class ItemsFormatError(ValueError):
    """A body or file row that is not a valid item (or batch of items); the message names the field."""


def items_from_json(data: Any) -> list:
    """Parsed JSON -> CorpusItems: one item object, a list of them, or {"items": [...]}."""
    if isinstance(data, dict) and "items" in data:
        if set(data) != {"items"}:
            raise ItemsFormatError('a batch is {"items": [...]} with no other keys')
        rows, prefix = data["items"], "items."
    elif isinstance(data, dict):
        rows, prefix = [data], ""
    elif isinstance(data, list):
        rows, prefix = data, "items."
    else:
        raise ItemsFormatError('expected an item object, a list of items, or {"items": [...]}')
    if not isinstance(rows, list) or not rows:
        raise ItemsFormatError("no items to add: the batch is empty")
    try:
        items = _ITEMS.validate_python(rows) if prefix else [_ITEM.validate_python(rows[0])]
        for n, it in enumerate(items):  # the one validation layer: well-formed text, no control characters, sizes
            check_item_fields(it.item_id, media=it.media, captions=it.captions, metadata=it.metadata,
                              prefix=f"items.{n}" if prefix else "")
    except ValidationError as exc:
        raise ItemsFormatError(_pydantic_message(exc, prefix)) from None
    except InputError as exc:
        raise ItemsFormatError(str(exc)) from None
    return [CorpusItem(it.item_id, it.modality, media=it.media,
                       embedding=np.asarray(it.embedding, dtype=np.float32) if it.embedding is not None else None,
                       captions=list(it.captions), metadata=dict(it.metadata)) for it in items]


def add_items_openapi(dim: int | None) -> tuple[dict, dict]:
    """The published POST /items request body (an item, a list, {"items": [...]}, or a multipart upload of
    an item without media + its file) with the run's embedding dimension, and the 201 response's links
    to the item's routes (followed by stateful API tests)."""
    item_schema = NewItem.model_json_schema()
    if dim:
        item_schema["properties"]["embedding"]["anyOf"][0].update(minItems=int(dim), maxItems=int(dim))
    upload_schema = NewItem.model_json_schema()
    for name in ("media", "embedding"):
        upload_schema["properties"].pop(name)
    body = {"required": True, "content": {
        "application/json": {"schema": {"oneOf": [
            item_schema, {"type": "array", "items": item_schema},
            {"type": "object", "properties": {"items": {"type": "array", "items": item_schema}}, "required": ["items"]}]}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["item", "file"], "additionalProperties": False, "properties": {
                "item": {**upload_schema, "description": "the item as JSON (item_id, modality, captions, metadata)"},
                "file": {"type": "string", "format": "binary", "description": "the media file"}}},
            "encoding": {"item": {"contentType": "application/json"}}}}}
    first = {"item_id": "$response.body#/items/0/item_id"}
    links = {"GetItem": {"operationId": "get_item_items__item_id__get", "parameters": first},
             "DeleteItem": {"operationId": "delete_item_items__item_id__delete", "parameters": first},
             "GetMedia": {"operationId": "get_media_media__item_id__get", "parameters": first}}
    return body, links
