"""HTTP serving of a trained run: FastAPI app over a Retriever, with micro-batched search and a search page.

    app = create_app(Retriever.from_run("runs/demo"), ServeConfig())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /search``, ``GET /items/{item_id}``, ``GET /media/{item_id}``, ``GET /health``,
``GET /stats``, ``GET /`` (the search page, ``ace/serving/static``), ``/docs`` and ``/openapi.json``; behind
the write API key: ``POST /items`` (one item or a batch, JSON with an embedding or a media path
inside the corpus root, or a multipart upload of one media file) and ``DELETE /items/{item_id}``.
An acknowledged (2xx) add or delete is committed to RUN/store.sqlite and searchable at once.

Micro-batching: each ``POST /search`` puts its query on a pending list; one worker task takes up
to ``max_batch`` pending queries (waiting at most ``max_wait_ms`` after the oldest arrived for
others to join) and answers them with one ``retriever.search`` call per distinct
``(k, beams, modality)`` in a single worker thread, so concurrent clients share one constrained
beam search. Media are served only from files inside the corpus root, looked up by item id -
never from a path in the request.

The retriever is any object with ``search(queries, k, num_beams, modality) -> list[list[SearchHit]]``,
``item(item_id) -> CorpusItem`` (KeyError or ValueError for unknown ids) and ``info() -> dict``
(see ``ace/serving/retriever.py``); the write endpoints also need ``add_items(items) -> identifiers`` and
``delete_items(ids) -> int`` (501 without them).
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import json
import logging
import math
import mimetypes
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from ace.config import ServeConfig

log = logging.getLogger("ace.serving.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"
Modality = Literal["image", "audio", "video", "text"]


class RetrieverLike(Protocol):
    def search(self, queries: list[str], k: int = 10, num_beams: int | None = None,
               modality: str | None = None) -> list[list[Any]]: ...
    def item(self, item_id: str) -> Any: ...
    def info(self) -> dict: ...


# -- request / response models (they make the published OpenAPI schema) --------------------------

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
    from ace.data.corpus import CorpusItem

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


def parse_new_items(data: Any, *, max_items: int) -> list:
    """items_from_json for a request body: HTTPException 413 (too many) or 422 (invalid)."""
    rows = data["items"] if isinstance(data, dict) and "items" in data else data
    if isinstance(rows, list) and len(rows) > max_items:
        raise HTTPException(413, f"{len(rows)} items in one request; this server's max_items_per_request is {max_items}")
    try:
        return items_from_json(data)
    except ItemsFormatError as exc:
        raise HTTPException(422, str(exc)) from None


def _write_error(exc: Exception) -> HTTPException:
    """Add/delete failures -> 404 (unknown id), 409 (id already used, or another writer), 422 (bad item)."""
    from ace.serving.store import DuplicateItemError, UnknownItemError

    kinds = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, UnknownItemError) or "ItemNotFoundError" in kinds:
        return HTTPException(404, str(exc))
    if isinstance(exc, DuplicateItemError) or kinds & {"ItemConflictError", "WriterLockError"}:
        return HTTPException(409, str(exc))
    if isinstance(exc, (ValueError, KeyError)):
        return HTTPException(422, str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    log.exception("item write failed")
    return HTTPException(500, f"item write failed: {type(exc).__name__}: {exc}")


def _upload_name(item_id: str, filename: str | None) -> str:
    """A safe file name for an upload: a hash of the item id + the original (sanitised) suffix."""
    suffix = Path(filename or "").suffix.lower()
    if not (1 < len(suffix) <= 10 and suffix[1:].isalnum()):
        suffix = ""
    return hashlib.sha1(item_id.encode()).hexdigest()[:20] + suffix


async def save_upload(upload: UploadFile, folder: Path, name: str) -> Path:
    """Write an uploaded file durably (temp file, fsync, rename) into ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    if final.exists():
        raise HTTPException(409, f"an uploaded file named {name} already exists in {folder}")
    tmp = folder / f".{name}.part"
    size = 0
    with open(tmp, "wb") as f:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if size == 0:
        tmp.unlink()
        raise HTTPException(422, "file: the uploaded file is empty")
    os.replace(tmp, final)
    return final


# -- micro-batching ------------------------------------------------------------------------------

class ServerBusy(Exception):
    """More searches are queued than ``max_queue``."""


@dataclass
class _Pending:
    query: str
    key: tuple                    # (k, beams, modality): one retriever call per distinct key
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchStats:
    batches: int = 0
    queries: int = 0
    max_size: int = 0
    calls: int = 0                # retriever.search calls (one per distinct key per batch)


class MicroBatcher:
    """Gathers concurrent searches into batches run by one worker thread."""

    def __init__(self, search_fn: Callable[[list[str], tuple], list[Any]], *, max_batch: int,
                 max_wait_ms: float, max_queue: int):
        self.search_fn = search_fn
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.stats = BatchStats()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._event = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ace-search")
        self._task = asyncio.create_task(self._worker(), name="ace-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(ServerBusy("server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, query: str, key: tuple) -> Any:
        if not self.alive:
            raise ServerBusy("search worker is not running")
        if len(self._pending) >= self.max_queue:
            raise ServerBusy(f"{len(self._pending)} searches queued (max_queue={self.max_queue})")
        loop = asyncio.get_running_loop()
        pending = _Pending(query, key, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._event.set()
        return await pending.future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._event.clear()
                await self._event.wait()
            deadline = self._pending[0].enqueued + self.max_wait
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._event.clear()
                try:
                    await asyncio.wait_for(self._event.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [p for p in batch if not p.future.done()]  # clients that gave up
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # _run_batch catches per group; this is a bug guard, not a fallback
                log.exception("micro-batch failed")
                outcomes = [exc] * len(batch)
            for p, out in zip(batch, outcomes):
                if p.future.done():
                    continue
                if isinstance(out, BaseException):
                    p.future.set_exception(out)
                else:
                    p.future.set_result(out)

    def _run_batch(self, batch: list[_Pending]) -> list[Any]:
        """Runs in the worker thread: one search_fn call per distinct key; a failing call is retried per query."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(p.key, []).append(i)
        outcomes: list[Any] = [None] * len(batch)
        for key, idx in groups.items():
            queries = [batch[i].query for i in idx]
            try:
                results = self._call(queries, key)
                for i, r in zip(idx, results):
                    outcomes[i] = r
            except Exception as exc:
                if len(idx) == 1:
                    outcomes[idx[0]] = exc
                    continue
                for i in idx:  # isolate the query that made the batch fail
                    try:
                        outcomes[i] = self._call([batch[i].query], key)[0]
                    except Exception as single_exc:
                        outcomes[i] = single_exc
        self.stats.batches += 1
        self.stats.queries += len(batch)
        self.stats.max_size = max(self.stats.max_size, len(batch))
        return outcomes

    def _call(self, queries: list[str], key: tuple) -> list[Any]:
        self.stats.calls += 1
        results = self.search_fn(queries, key)
        if len(results) != len(queries):
            raise RuntimeError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
        return results


# -- auth ----------------------------------------------------------------------------------------

def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return None


def _check_key(request: Request, what: str) -> None:
    expected = request.app.state.api_key
    if expected is None:
        raise HTTPException(403, f"{what} disabled: no API key configured (set ServeConfig.api_key or ACE_API_KEY)")
    presented = _presented_key(request)
    if presented is None:
        raise HTTPException(401, f"{what} require an API key (header 'X-API-Key: KEY' or 'Authorization: Bearer KEY')",
                            headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})


def require_write_key(request: Request) -> None:
    """Dependency for write endpoints (POST /items, DELETE /items/{id}): always keyed."""
    _check_key(request, "write endpoints are")


def require_read_key(request: Request) -> None:
    """Dependency for read endpoints: keyed only when ``read_requires_key``."""
    if request.app.state.config.read_requires_key:
        _check_key(request, "read endpoints")


# -- body size limit -----------------------------------------------------------------------------

class BodyLimitMiddleware:
    """Refuses request bodies above a limit with 413: by Content-Length up front, else while streaming."""

    def __init__(self, app, *, max_body_bytes: int, max_upload_bytes: int, upload_paths: Sequence[str] = ("/items",)):
        self.app = app
        self.max_body, self.max_upload, self.upload_paths = max_body_bytes, max_upload_bytes, tuple(upload_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") in self.upload_paths
        limit = self.max_upload if is_upload else self.max_body
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_json(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_json(send, 413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}, status_code=status).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- helpers -------------------------------------------------------------------------------------

def _validation_message(exc: RequestValidationError) -> tuple[int, str, list[dict]]:
    errors = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        errors.append({"field": ".".join(loc) or "body", "message": str(err.get("msg", "invalid"))})
    kinds = {e.get("type") for e in exc.errors()}
    if "json_invalid" in kinds:
        err = next(e for e in exc.errors() if e.get("type") == "json_invalid")
        reason = (err.get("ctx") or {}).get("error", "invalid JSON")
        return 400, f"malformed JSON body: {reason}", errors
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
        return 422, 'request body is required: a JSON object like {"query": "a dog on a beach"}', errors
    if any(e.get("type") in ("model_attributes_type", "dict_type") and tuple(e.get("loc", ())) == ("body",)
           for e in exc.errors()):
        return 422, 'request body must be a JSON object (Content-Type: application/json) like {"query": "..."}', errors
    return 422, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors


def _finite_or_none(x: Any) -> float | None:
    """JSON has no NaN/inf: a non-finite score is sent as null (a non-number score is a retriever bug and raises)."""
    v = float(x)
    return v if math.isfinite(v) else None


def media_url(item_id: str) -> str:
    return "/media/" + quote(item_id, safe="")


def poster_url(item) -> str | None:
    """URL of a video item's poster frame (GET /poster/{item_id}); None for other items and items without media."""
    return "/poster/" + quote(item.item_id, safe="") if item.modality == "video" and item.media else None


def resolve_media_file(media: str, root: Path) -> Path:
    """Real path of an item's media file; PermissionError when it resolves outside ``root``."""
    root_real = Path(os.path.realpath(root))
    p = Path(media)
    real = Path(os.path.realpath(p if p.is_absolute() else root_real / p))
    if real != root_real and root_real not in real.parents:
        raise PermissionError(f"media path {media!r} resolves outside the corpus root {root_real}")
    return real


def _media_root_of(retriever: Any) -> Path | None:
    """The run's corpus root: ``retriever.corpus_root``, else ``retriever.corpus.root``."""
    root = getattr(retriever, "corpus_root", None)
    if root is None:
        root = getattr(getattr(retriever, "corpus", None), "root", None)
    return Path(root) if root is not None else None


class _Latency:
    """Counts of served/failed searches and the latencies (ms) of the most recent ``window``."""

    def __init__(self, window: int):
        self.values: collections.deque[float] = collections.deque(maxlen=window)
        self.served = self.failed = 0

    def add(self, ms: float) -> None:
        self.served += 1
        self.values.append(ms)

    def summary(self) -> dict:
        if not self.values:
            return {"count": 0, "p50": None, "p90": None, "p99": None, "mean": None}
        v = np.fromiter(self.values, dtype=np.float64)
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return {"count": int(v.size), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
                "p99": round(float(p99), 3), "mean": round(float(v.mean()), 3)}


# -- the app -------------------------------------------------------------------------------------

def create_app(retriever: RetrieverLike, config: ServeConfig | None = None, *, media_root: str | Path | None = None) -> FastAPI:
    """FastAPI app serving ``retriever``; media from ``media_root`` (else config.media_root, else the run's corpus root)."""
    config = config or ServeConfig()
    root = media_root or config.media_root or _media_root_of(retriever)
    root = Path(root).resolve() if root is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"media root is not a directory: {root}")

    def item_dict(item_id: str) -> dict:
        item = retriever.item(item_id)
        return {"item_id": item.item_id, "modality": item.modality,
                "media_url": media_url(item.item_id) if item.media else None, "poster_url": poster_url(item),
                "captions": [str(c) for c in (item.captions or [])[:config.result_captions]]}

    is_deleted = getattr(retriever, "is_deleted", lambda item_id: False)
    posters: dict[Path, bytes] = {}   # video file -> JPEG poster (decoded once; at most 512 kept)
    posters_lock = threading.Lock()

    def search_batch(queries: list[str], key: tuple) -> list[list[dict]]:
        k, beams, modality = key
        ranked = retriever.search(queries, k=k, num_beams=beams, modality=modality)
        out = []
        for hits in ranked:
            rows = []
            for h in hits:
                try:
                    meta = item_dict(h.item_id)
                except (KeyError, ValueError):
                    if is_deleted(h.item_id):  # deleted after the search ran, before its results were read
                        continue
                    raise RuntimeError(f"retriever returned item {h.item_id!r} that its item() does not know") from None
                rows.append({**meta, "modality": h.modality, "score": _finite_or_none(h.score),
                             "identifier": [int(c) for c in h.identifier], "source": str(h.source)})
            out.append(rows)
        return out

    batcher = MicroBatcher(search_batch, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                           max_queue=config.max_queue)
    latency = _Latency(config.latency_window)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="ACE retrieval server", version="1", lifespan=lifespan,
                  description="Generative cross-modal retrieval: a text query is decoded into the "
                              "identifiers of matching images, audio clips and videos.")
    app.state.retriever, app.state.config, app.state.batcher = retriever, config, batcher
    app.state.api_key = config.resolved_api_key()
    app.state.media_root = root
    app.state.latency = latency
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes,
                       max_upload_bytes=config.max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        status, message, errors = _validation_message(exc)
        return JSONResponse({"detail": message, "errors": errors}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's text, e.g. bad UTF-8
            detail = "request body could not be parsed: send UTF-8 JSON with Content-Type: application/json"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal server error: {type(exc).__name__}: {exc}"}, status_code=500)

    read = [Depends(require_read_key)]

    @app.post("/search", response_model=SearchResponse, dependencies=read,
              responses={400: {"description": "malformed JSON or rejected query"},
                         422: {"description": "invalid field"}, 503: {"description": "server busy"}})
    async def search(req: SearchRequest) -> JSONResponse:
        """Ranked items for a text query (micro-batched with concurrent requests)."""
        query = req.query.strip()
        if not query:
            raise HTTPException(422, "query: must not be empty")
        if len(query) > config.max_query_chars:
            raise HTTPException(422, f"query: {len(query)} characters, the limit is {config.max_query_chars}")
        k = req.k if req.k is not None else config.default_k
        if k > config.max_k:
            raise HTTPException(422, f"k: {k} exceeds this server's max_k = {config.max_k}")
        if req.beams is not None and req.beams > config.max_beams:
            raise HTTPException(422, f"beams: {req.beams} exceeds this server's max_beams = {config.max_beams}")
        t0 = time.perf_counter()
        try:
            results = await asyncio.wait_for(batcher.submit(query, (k, req.beams, req.modality)),
                                             timeout=config.search_timeout_s)
        except ServerBusy as exc:
            latency.failed += 1
            raise HTTPException(503, f"server busy: {exc}", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            latency.failed += 1
            raise HTTPException(504, f"search not answered within {config.search_timeout_s} s") from None
        except (ValueError, KeyError) as exc:
            latency.failed += 1
            raise HTTPException(400, f"search rejected: {exc}") from None
        except Exception as exc:
            latency.failed += 1
            log.exception("search failed")
            raise HTTPException(500, f"search failed: {type(exc).__name__}: {exc}") from None
        ms = (time.perf_counter() - t0) * 1000.0
        latency.add(ms)
        # built from plain str/int/float/list values already: skip response-model re-validation (hot path)
        return JSONResponse({"query": query, "k": k, "modality": req.modality, "results": results,
                             "latency_ms": round(ms, 3)})

    def lookup(item_id: str):
        try:
            return retriever.item(item_id)
        except (KeyError, ValueError):  # retriever.item's only failure is an unknown id (RetrieverError is a ValueError)
            raise HTTPException(404, f"unknown item id: {item_id!r}") from None

    @app.get("/items/{item_id:path}", response_model=ItemResponse, dependencies=read,
             responses={404: {"description": "unknown item"}})
    def get_item(item_id: str) -> dict:
        """One item: modality, captions, metadata, media URL."""
        item = lookup(item_id)
        return {"item_id": item.item_id, "modality": item.modality,
                "media_url": media_url(item.item_id) if item.media else None, "poster_url": poster_url(item),
                "captions": [str(c) for c in (item.captions or [])],
                "metadata": jsonable_encoder(item.metadata or {}, custom_encoder={np.generic: lambda x: x.item()}),
                "has_embedding": getattr(item, "embedding", None) is not None}

    write = [Depends(require_write_key)]

    item_schema = NewItem.model_json_schema()
    body_doc = {"required": True, "content": {
        "application/json": {"schema": {"oneOf": [
            item_schema, {"type": "array", "items": item_schema},
            {"type": "object", "properties": {"items": {"type": "array", "items": item_schema}}, "required": ["items"]}]}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["item", "file"], "properties": {
            "item": {"type": "string", "description": "the item as JSON (item_id, modality, captions, metadata)"},
            "file": {"type": "string", "format": "binary", "description": "the media file"}}}}}}

    @app.post("/items", dependencies=write, status_code=201, response_model=AddItemsResponse,
              openapi_extra={"requestBody": body_doc},
              responses={400: {"description": "malformed body"}, 404: {"description": "unknown item"},
                         409: {"description": "item id already used"}, 413: {"description": "too large"},
                         422: {"description": "invalid item"}, 501: {"description": "retriever is read-only"}})
    async def add_items(request: Request) -> JSONResponse:
        """Add one item or a batch (one transaction): JSON (an item, a list, or {"items": [...]}) with an
        embedding or a media path inside the corpus root; or multipart/form-data with a field `item`
        (the item as JSON, without media) and a field `file` (the media file, stored under the corpus
        root's uploads/). Each item gets its identifier at once and is searchable when this returns."""
        add = getattr(retriever, "add_items", None)
        if add is None:
            raise HTTPException(501, "this server's retriever cannot add items (read-only)")
        uploaded: Path | None = None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            items, uploaded = await _upload_item(request)
        else:
            raw = await request.body()
            if not raw.strip():
                raise HTTPException(422, 'request body is required: an item like {"item_id": "x1", "modality": '
                                         '"image", "embedding": [...]} or {"items": [...]}')
            items = await run_in_threadpool(_parse_body, raw)  # large batches: keep the event loop free
        try:
            identifiers = await run_in_threadpool(add, items)
        except Exception as exc:
            if uploaded is not None:
                uploaded.unlink(missing_ok=True)
            raise _write_error(exc) from None
        return JSONResponse({"added": len(items), "items": [
            {"item_id": it.item_id, "identifier": [int(c) for c in ident], "source": "fallback"}
            for it, ident in zip(items, identifiers)]}, status_code=201)

    def _parse_body(raw: bytes) -> list:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"malformed JSON body: {exc}") from None
        return parse_new_items(data, max_items=config.max_items_per_request)

    async def _upload_item(request: Request) -> tuple[list, Path]:
        upload_root = _media_root_of(retriever)
        if upload_root is None:
            raise HTTPException(422, "uploads need a corpus root; this run has none: send an embedding instead")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as exc:  # malformed multipart / too many parts
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        extra = set(form.keys()) - {"item", "file"}
        if extra:
            raise HTTPException(422, f"unknown form field(s) {sorted(extra)}: send `item` (JSON) and `file`")
        upload, raw = form.get("file"), form.get("item")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "file: a multipart upload needs a file field named `file`")
        if not isinstance(raw, str):
            raise HTTPException(422, 'item: a multipart upload needs a field `item` with the item as JSON, '
                                     'e.g. {"item_id": "x1", "modality": "image", "captions": ["..."]}')
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"item: malformed JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "item: must be one JSON object (one file per request)")
        if data.get("media") is not None or data.get("embedding") is not None:
            raise HTTPException(422, "item: an uploaded item takes its media from `file`; leave out media and embedding")
        (item,) = parse_new_items(data, max_items=1)
        name = _upload_name(item.item_id, upload.filename)
        if (Path(upload_root) / "uploads" / name).exists():
            raise HTTPException(409, f"item {item.item_id!r} already has an uploaded file; item ids are never reused")
        path = await save_upload(upload, Path(upload_root) / "uploads", name)
        item.media = str(path.relative_to(Path(upload_root)))
        return [item], path

    @app.delete("/items/{item_id:path}", dependencies=write,
                responses={404: {"description": "unknown or already deleted"}, 501: {"description": "read-only"}})
    def delete_item(item_id: str) -> dict:
        """Delete an item of any source (trained, added or folded), durably; it is never returned again."""
        delete = getattr(retriever, "delete_items", None)
        if delete is None:
            raise HTTPException(501, "this server's retriever cannot delete items (read-only)")
        try:
            delete([item_id])
        except Exception as exc:
            raise _write_error(exc) from None
        return {"deleted": item_id}

    @app.get("/media/{item_id:path}", dependencies=read, response_class=FileResponse,
             responses={403: {"description": "media file outside the corpus root"},
                        404: {"description": "unknown item or no media file"}})
    def get_media(item_id: str):
        """Streams the item's media file (HTTP range requests supported); only files inside the corpus root."""
        path = media_file(item_id)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/poster/{item_id:path}", dependencies=read, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG still of the video"},
                        404: {"description": "unknown item, not a video, or no media file"},
                        422: {"description": "the video cannot be decoded"}})
    def get_poster(item_id: str) -> Response:
        """A still frame (the middle one) of a video item as JPEG: the search page's poster for video cards,
        shown even where the browser cannot play the video's codec."""
        if lookup(item_id).modality != "video":
            raise HTTPException(404, f"item {item_id!r} is not a video; posters exist for video items only")
        path = media_file(item_id)
        with posters_lock:
            data = posters.get(path)
        if data is None:
            from ace.data.encoders import EncoderError, read_video_frames

            try:
                frames = read_video_frames(path, 3, item_id=item_id)
            except EncoderError as exc:
                raise HTTPException(422, f"no poster: {exc}") from None
            buf = io.BytesIO()
            frames[len(frames) // 2].convert("RGB").save(buf, format="JPEG", quality=85)
            data = buf.getvalue()
            with posters_lock:
                if len(posters) >= 512:
                    posters.pop(next(iter(posters)))
                posters[path] = data
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    def media_file(item_id: str) -> Path:
        """The item's media file inside the corpus root (HTTP errors: 404 unknown / no file, 403 outside the root)."""
        item = lookup(item_id)
        if not item.media:
            raise HTTPException(404, f"item {item_id!r} has no media file")
        if root is None:
            raise HTTPException(404, "media serving is disabled: no corpus root configured")
        try:
            path = resolve_media_file(str(item.media), root)
        except PermissionError:
            log.warning("refused media of item %r: %r resolves outside %s", item_id, item.media, root)
            raise HTTPException(403, f"media of item {item_id!r} is outside the corpus root; refused") from None
        if not path.is_file():
            raise HTTPException(404, f"media file of item {item_id!r} is missing")
        return path

    @app.get("/health")
    def health() -> JSONResponse:
        """Liveness: 200 while the search worker runs."""
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "search worker not running"}, status_code=200 if ok else 503)

    @app.get("/stats", dependencies=read)
    def stats() -> dict:
        """Items, queries served, latency percentiles (ms), micro-batch sizes, model and identifier versions."""
        info = jsonable_encoder(retriever.info(), custom_encoder={np.generic: lambda x: x.item()})
        s = batcher.stats
        return {"items": info.get("items", info.get("num_items")), "items_by_source": info.get("by_source"),
                "queries_served": latency.served,
                "queries_failed": latency.failed, "latency_ms": latency.summary(),
                "batches": {"count": s.batches, "retriever_calls": s.calls, "max_size": s.max_size,
                            "mean_size": round(s.queries / s.batches, 3) if s.batches else None,
                            "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms},
                "model_version": info.get("model_version"), "identifier_version": info.get("identifier_version"),
                "retriever": info, "uptime_s": round(time.time() - started, 1)}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
