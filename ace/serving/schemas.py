"""The HTTP API's data shapes (pydantic models: they make the published OpenAPI schema) and the item
JSON schema shared by ``POST /items`` and the items CLI (``items_from_json``)."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from ace.data.corpus import CorpusItem

Modality = Literal["image", "audio", "video", "text"]


class SearchRequest(BaseModel):
    """A text query; k, modality filter and beam width are optional."""
    model_config = ConfigDict(extra="forbid")
    query: StrictStr = Field(description="text query (non-empty, at most max_query_chars characters)")
    k: StrictInt | None = Field(None, ge=1, le=100, description="results to return (default: config default_k = 10)")
    modality: Modality | None = Field(None, description="only items of this modality")
    beams: StrictInt | None = Field(None, ge=1, description="beam width of the constrained beam search (default: the run's)")


class SearchResult(BaseModel):
    item_id: str
    modality: str
    score: float | None = Field(description="the retriever's score (generative: sequence log-probability); null if not finite")
    identifier: list[int] = Field(description="semantic identifier (k, v1..vM, u)")
    source: str = Field(description="'generative' or 'fallback'")
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
    item_id: StrictStr = Field(min_length=1, max_length=512, description="new, never used before in this run")
    modality: Modality
    embedding: list[float] | None = Field(None, description="item embedding; else the run's encoder reads `media`")
    media: StrictStr | None = Field(None, description="media file path, relative to the corpus root (or absolute inside it)")
    captions: list[StrictStr] = Field(default_factory=list)
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
    except ValidationError as exc:
        raise ItemsFormatError(_pydantic_message(exc, prefix)) from None
    return [CorpusItem(it.item_id, it.modality, media=it.media,
                       embedding=np.asarray(it.embedding, dtype=np.float32) if it.embedding is not None else None,
                       captions=list(it.captions), metadata=dict(it.metadata)) for it in items]
