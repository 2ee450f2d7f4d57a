"""HTTP serving of a trained run: FastAPI app over a Retriever, with micro-batched search and a search page.

    app = create_app(Retriever.from_run("runs/demo"), ServeConfig())   # then uvicorn.run(app, port=8000)

Endpoints: ``POST /search``, ``GET /items/{item_id}``, ``GET /media/{item_id}``, ``GET /health``, ``GET /stats``,
``GET /`` (the search page, ``ace/serving/static``), ``/docs``, ``/openapi.json``; behind the write API key:
``POST /items`` (JSON items with an embedding or a media path inside the corpus root, or a multipart upload)
and ``DELETE /items/{item_id}``. An acknowledged (2xx) write is committed to the item store, searchable at once.

Concurrent ``POST /search`` requests share one constrained beam search (ace/serving/batcher.py); checks
(API keys, body limits) live in ace/serving/guards.py, data shapes in ace/serving/schemas.py; a background
thread keeps the retriever in step with other replicas' writes and folds (ace/serving/replica.py).
Media are served only from files inside the corpus root, looked up by item id, never from a request path.
The retriever: any object with ``search(queries, k, num_beams, modality)``, ``item(item_id)`` (KeyError or
ValueError if unknown), ``info()``; writes need ``add_items(items)`` and ``delete_items(ids)`` (else 501).
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from pydantic import Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ace.config import ServeConfig
from ace.serving.batcher import LatencyStats, MicroBatcher, SearchKeys, ServerBusy
from ace.serving.errors import ItemConflictError, ItemNotFoundError, SearchModeUnavailableError, WriterLockError
from ace.serving.guards import BodyLimitMiddleware, validation_message, require_read_key, require_write_key
from ace.serving.media import (MediaPathError, UploadError, UploadExistsError, media_response_headers,
                               resolve_item_media, save_upload, upload_name)
from ace.serving.replica import ReplicaSync
from ace.serving.schemas import (AddItemsResponse, ItemResponse, ItemsFormatError, SearchRequest as BaseSearchRequest,
                                 SearchResponse, add_items_openapi, items_from_json)
from ace.serving.store import DuplicateItemError, UnknownItemError
from ace.validation import QUERY_PATTERN, InputError, check_query

log = logging.getLogger("ace.serving.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"


class RetrieverLike(Protocol):
    def search(self, queries: list[str], k: int = 10, num_beams: int | None = None,
               modality: str | None = None) -> list[list[Any]]: ...
    def item(self, item_id: str) -> Any: ...
    def info(self) -> dict: ...


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
    if isinstance(exc, (UnknownItemError, ItemNotFoundError)):
        return HTTPException(404, str(exc))
    if isinstance(exc, (DuplicateItemError, ItemConflictError, WriterLockError)):
        return HTTPException(409, str(exc))
    if isinstance(exc, (ValueError, KeyError)):
        return HTTPException(422, str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    return exc  # a server error: the generic handler logs it under a request id


# -- helpers -------------------------------------------------------------------------------------

def _finite_or_none(x: Any) -> float | None:
    """JSON has no NaN/inf: a non-finite score is sent as null (a non-number score is a retriever bug and raises)."""
    if x is None:  # a field the hit does not carry (e.g. cosine outside hybrid mode)
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def media_url(item_id: str) -> str:
    return "/media/" + quote(item_id, safe="")


def poster_url(item) -> str | None:
    """URL of a video item's poster frame (GET /poster/{item_id}); None for other items and items without media."""
    return "/poster/" + quote(item.item_id, safe="") if item.modality == "video" and item.media else None


def _media_root_of(retriever: Any) -> Path | None:
    """The run's corpus root: ``retriever.corpus_root``, else ``retriever.corpus.root``."""
    root = getattr(retriever, "corpus_root", None)
    if root is None:
        root = getattr(getattr(retriever, "corpus", None), "root", None)
    return Path(root) if root is not None else None


# -- the app -------------------------------------------------------------------------------------

def create_app(retriever: RetrieverLike, config: ServeConfig | None = None, *, media_root: str | Path | None = None) -> FastAPI:
    """FastAPI app serving ``retriever``; media from ``media_root`` (else config.media_root, else the run's corpus root)."""
    config = config or ServeConfig()
    root = media_root or config.media_root or _media_root_of(retriever)
    root = Path(root).resolve() if root is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"media root is not a directory: {root}")

    keys = SearchKeys(retriever)  # what one retriever call can mix (k, beams, modality)
    batcher = MicroBatcher(_search_batch_fn(retriever, config, keys), max_batch=config.max_batch,
                           max_wait_ms=config.max_wait_ms, max_queue=config.max_queue)
    latency = LatencyStats(config.latency_window)
    sync = (ReplicaSync(retriever, interval_s=config.store.poll_interval_s, reload_model=config.store.reload_model)
            if ReplicaSync.supported(retriever) else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        sync and sync.start()
        try:
            yield
        finally:
            sync and sync.stop()
            await batcher.stop()

    app = FastAPI(title="ACE retrieval server", version="1", lifespan=lifespan,
                  description="Generative cross-modal retrieval: a text query is decoded into the "
                              "identifiers of matching images, audio clips and videos.")
    app.state.retriever, app.state.config, app.state.batcher, app.state.replica_sync = retriever, config, batcher, sync
    app.state.api_key = config.resolved_api_key()
    app.state.media_root = root
    app.state.latency = latency
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=config.max_body_bytes,
                       max_upload_bytes=config.max_upload_bytes)
    _add_error_handlers(app)
    _add_search_routes(app, config, batcher, latency, keys)
    _add_item_routes(app, retriever, config)
    _add_media_routes(app, retriever, root)
    _add_status_routes(app, retriever, config, batcher, latency)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _item_summary(retriever: RetrieverLike, item_id: str, config: ServeConfig) -> dict:
    """An item as a search result shows it (media URL, first ``result_captions`` captions)."""
    item = retriever.item(item_id)
    return {"item_id": item.item_id, "modality": item.modality,
            "media_url": media_url(item.item_id) if item.media else None, "poster_url": poster_url(item),
            "captions": [str(c) for c in (item.captions or [])[:config.result_captions]]}


def _search_batch_fn(retriever: RetrieverLike, config: ServeConfig,
                     search_keys: SearchKeys) -> Callable[[list[str], list[tuple]], list[list[dict]]]:
    """What the micro-batcher runs in its worker thread for queries whose ``SearchKeys`` agree on what the
    retriever cannot mix: one retriever.search (one k / beams / modality per query where it takes them,
    else the largest k), each query's results cut to its own k."""
    is_deleted = getattr(retriever, "is_deleted", lambda item_id: False)

    def search_batch(queries: list[str], keys: list[tuple]) -> list[list[dict]]:
        ranked = retriever.search(queries, **search_keys.call_args(keys))
        out = []
        for hits, key in zip(ranked, keys):
            rows = []
            for h in hits[:key[0]]:
                try:
                    meta = _item_summary(retriever, h.item_id, config)
                except (KeyError, ValueError):
                    if is_deleted(h.item_id):  # deleted after the search ran, before its results were read
                        continue
                    raise RuntimeError(f"retriever returned item {h.item_id!r} that its item() does not know") from None
                rows.append({**meta, "modality": h.modality, "score": _finite_or_none(h.score),
                             "identifier": [int(c) for c in h.identifier], "source": str(h.source),
                             "mode": getattr(h, "mode", None), "raw_score": _finite_or_none(getattr(h, "raw_score", None)),
                             "cosine": _finite_or_none(getattr(h, "cosine", None))})
            out.append(rows)
        return out

    return search_batch


# -- routes --------------------------------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        status, message, errors = validation_message(exc)
        return JSONResponse({"detail": message, "errors": errors}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's text, e.g. bad UTF-8
            detail = "request body could not be parsed: send UTF-8 JSON with Content-Type: application/json"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception):
        """A server error: a request id and a generic message for the client; the details go to the log."""
        rid = secrets.token_hex(8)
        log.error("request %s: unhandled error on %s %s", rid, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error; the server log has the details under this request id",
                             "request_id": rid}, status_code=500, headers={"X-Request-ID": rid})

    async def _method_not_allowed(request: Request, exc: StarletteHTTPException):
        """405 with an Allow header listing every method of the path (GET and DELETE /items/{id} are two routes)."""
        allowed = sorted({m for r in app.routes if getattr(r, "methods", None) and r.path_regex.match(request.url.path)
                          for m in r.methods})
        return JSONResponse({"detail": f"method {request.method} not allowed here; allowed: {', '.join(allowed)}"},
                            status_code=405, headers={"Allow": ", ".join(allowed)})

    app.add_exception_handler(405, _method_not_allowed)


def _add_search_routes(app: FastAPI, config: ServeConfig, batcher: MicroBatcher, latency: LatencyStats,
                       search_keys: SearchKeys) -> None:
    read = [Depends(require_read_key)]

    class SearchRequest(BaseSearchRequest):  # this server's limits, stated in the published schema (checked below)
        query: StrictStr = Field(description="text query: not blank, no control characters but tab/newline",
                                 json_schema_extra={"minLength": 1, "maxLength": config.max_query_chars,
                                                    "pattern": QUERY_PATTERN})
        k: StrictInt | None = Field(None, ge=1, le=100, json_schema_extra={"maximum": config.max_k},
                                    description="results to return (default: config default_k)")
        beams: StrictInt | None = Field(None, ge=1, json_schema_extra={"maximum": config.max_beams},
                                        description="beam width of the constrained beam search (default: the run's)")

    async def search(req: BaseSearchRequest) -> JSONResponse:
        """Ranked items for a text query (micro-batched with concurrent requests)."""
        try:
            query = check_query(req.query, max_chars=config.max_query_chars).strip()
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        k = req.k if req.k is not None else config.default_k
        if k > config.max_k:
            raise HTTPException(422, f"k: {k} exceeds this server's max_k = {config.max_k}")
        if req.beams is not None and req.beams > config.max_beams:
            raise HTTPException(422, f"beams: {req.beams} exceeds this server's max_beams = {config.max_beams}")
        t0 = time.perf_counter()
        try:
            # one retriever call for whatever it can mix (each query keeps its own k, beams, modality)
            results = await asyncio.wait_for(batcher.submit(query, search_keys.key(k, req.modality, req.beams, req.mode)),
                                             timeout=config.search_timeout_s)
        except ServerBusy as exc:
            latency.failed += 1
            raise HTTPException(503, f"server busy: {exc}", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            latency.failed += 1
            raise HTTPException(504, f"search not answered within {config.search_timeout_s} s") from None
        except (ValueError, KeyError) as exc:  # a mode this run cannot serve: a 422 naming `mode`
            latency.failed += 1
            unavailable = isinstance(exc, SearchModeUnavailableError)
            raise HTTPException(422 if unavailable else 400, f"{'mode' if unavailable else 'search rejected'}: {exc}") from None
        except Exception:
            latency.failed += 1
            raise  # a server error: logged with a request id, a generic 500 for the client
        ms = (time.perf_counter() - t0) * 1000.0
        latency.add(ms)
        # built from plain str/int/float/list values already: skip response-model re-validation (hot path)
        return JSONResponse({"query": query, "k": k, "modality": req.modality, "results": results,
                             "latency_ms": round(ms, 3)})

    search.__annotations__["req"] = SearchRequest  # a class of this app: FastAPI must not resolve it by name
    app.post("/search", response_model=SearchResponse, dependencies=read, responses={
        400: {"description": "malformed JSON or rejected query"}, 401: {"description": "API key required (read_requires_key)"},
        403: {"description": "reads need a key and none is configured"}, 413: {"description": "body too large"},
        422: {"description": "invalid field"}, 503: {"description": "server busy"}})(search)


def _add_item_routes(app: FastAPI, retriever: RetrieverLike, config: ServeConfig) -> None:
    """GET /items/{id}; behind the write key POST /items and DELETE /items/{id}."""
    read = [Depends(require_read_key)]
    write = [Depends(require_write_key)]

    @app.get("/items/{item_id:path}", response_model=ItemResponse, dependencies=read,
             responses={**KEYED, 404: {"description": "unknown item"}})
    def get_item(item_id: str) -> dict:
        """One item: modality, captions, metadata, media URL."""
        item = _lookup(retriever, item_id)
        return {"item_id": item.item_id, "modality": item.modality,
                "media_url": media_url(item.item_id) if item.media else None, "poster_url": poster_url(item),
                "captions": [str(c) for c in (item.captions or [])],
                "metadata": jsonable_encoder(item.metadata or {}, custom_encoder={np.generic: lambda x: x.item()}),
                "has_embedding": getattr(item, "embedding", None) is not None}

    body_doc, added_links = add_items_openapi(getattr(getattr(retriever, "id_tokenizer", None), "dim", None))

    @app.post("/items", dependencies=write, status_code=201, response_model=AddItemsResponse,
              openapi_extra={"requestBody": body_doc},
              responses={201: {"description": "added", "links": added_links}, 400: {"description": "malformed body"},
                         **KEYED, 404: {"description": "unknown item"},
                         409: {"description": "item id already used"}, 413: {"description": "too large"},
                         422: {"description": "invalid item"}, 501: {"description": "retriever is read-only"}})
    async def add_items(request: Request) -> JSONResponse:
        """Add one item or a batch (one transaction): JSON (an item, a list, or {"items": [...]}) with an
        embedding or a media path inside the corpus root; or multipart/form-data with a field `item`
        (the item as JSON, without media) and a field `file` (the media file, stored in the run's
        uploads/). Each item gets its identifier at once and is searchable when this returns."""
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
                uploaded.unlink(missing_ok=True)  # this request's own file (claimed by a unique link)
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
        run_dir = getattr(retriever, "run_dir", None)
        if run_dir is None:
            raise HTTPException(422, "uploads are stored in the run folder; this retriever has none: send an embedding")
        try:
            form = await request.form(max_files=1, max_fields=4)
        except StarletteHTTPException:
            raise  # 413 from the body limit, while streaming
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
        try:
            path, item.media = await save_upload(upload, run_dir, upload_name(item.item_id, upload.filename))
        except UploadExistsError:
            raise HTTPException(409, f"item {item.item_id!r} already has an uploaded file; item ids are never reused") from None
        except UploadError as exc:
            raise HTTPException(422, str(exc)) from None
        return [item], path

    @app.delete("/items/{item_id:path}", dependencies=write,
                responses={**KEYED, 404: {"description": "unknown or already deleted"}, 409: {"description": "another writer"},
                           501: {"description": "read-only"}})
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


KEYED = {401: {"description": "API key missing or wrong"}, 403: {"description": "no API key configured"}}


def _lookup(retriever: RetrieverLike, item_id: str):
    try:
        return retriever.item(item_id)
    except (KeyError, ValueError):  # retriever.item's only failure is an unknown id (RetrieverError is a ValueError)
        raise HTTPException(404, f"unknown item id: {item_id!r}") from None


def _add_media_routes(app: FastAPI, retriever: RetrieverLike, root: Path | None) -> None:
    """GET /media/{id} (the item's file, only inside the corpus root) and GET /poster/{id} (a video's still)."""
    read = [Depends(require_read_key)]
    posters: dict[Path, bytes] = {}   # video file -> JPEG poster (decoded once; at most 512 kept)
    posters_lock = threading.Lock()

    def media_file(item_id: str) -> Path:
        """The item's media file inside the corpus root or the run's uploads (HTTP errors: 404 unknown / no file,
        403 outside its root)."""
        item = _lookup(retriever, item_id)
        if not item.media:
            raise HTTPException(404, f"item {item_id!r} has no media file")
        try:
            path = resolve_item_media(str(item.media), root, getattr(retriever, "run_dir", None))
        except MediaPathError:
            log.warning("refused media of item %r: %r resolves outside its root", item_id, item.media)
            raise HTTPException(403, f"media of item {item_id!r} is outside the corpus root; refused") from None
        except ValueError:
            raise HTTPException(404, "media serving is disabled: no corpus root configured") from None
        if not path.is_file():
            raise HTTPException(404, f"media file of item {item_id!r} is missing")
        return path

    @app.get("/media/{item_id:path}", dependencies=read, response_class=FileResponse,
             responses={**KEYED, 403: {"description": "media file outside the corpus root"},
                        404: {"description": "unknown item or no media file"}})
    def get_media(item_id: str):
        """Streams the item's media file (HTTP range requests supported); only files inside the corpus root
        (or the run's uploads). Images, audio, video and plain text are sent as themselves, anything else as
        an octet-stream attachment; always with nosniff and a sandboxing Content-Security-Policy."""
        kind, headers = media_response_headers(path := media_file(item_id))
        return FileResponse(path, media_type=kind, headers=headers)

    @app.get("/poster/{item_id:path}", dependencies=read, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG still of the video"}, **KEYED,
                        404: {"description": "unknown item, not a video, or no media file"},
                        422: {"description": "the video cannot be decoded"}})
    def get_poster(item_id: str) -> Response:
        """A still frame (the middle one) of a video item as JPEG: the search page's poster for video cards,
        shown even where the browser cannot play the video's codec."""
        if _lookup(retriever, item_id).modality != "video":
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


def _add_status_routes(app: FastAPI, retriever: RetrieverLike, config: ServeConfig, batcher: MicroBatcher,
                       latency: LatencyStats) -> None:
    read = [Depends(require_read_key)]
    started = time.time()

    @app.get("/health")
    def health() -> JSONResponse:
        """Liveness: 200 while the search worker runs."""
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "search worker not running"}, status_code=200 if ok else 503)

    @app.get("/stats", dependencies=read, responses=KEYED)
    def stats() -> dict:
        """Items, queries served, latency percentiles (ms), micro-batch sizes, model and identifier versions,
        stored rows that are quarantined (not served). No file system paths."""
        info = jsonable_encoder(retriever.info(), custom_encoder={np.generic: lambda x: x.item()})
        s = batcher.stats
        return {"items": info.get("items", info.get("num_items")), "items_by_source": info.get("by_source"),
                "queries_served": latency.served,
                "queries_failed": latency.failed, "latency_ms": latency.summary(),
                "batches": {"count": s.batches, "retriever_calls": s.calls, "max_size": s.max_size,
                            "mean_size": round(s.queries / s.batches, 3) if s.batches else None,
                            "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms},
                "model_version": info.get("model_version"), "identifier_version": info.get("identifier_version"),
                "quarantined": info.get("quarantined", {"count": 0, "items": []}),
                "retriever": info, "uptime_s": round(time.time() - started, 1)}
