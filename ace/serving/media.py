"""Media files of a served run: where uploads are stored, how an item's media path resolves, and how
``GET /media/{item_id}`` sends a file without letting it run as a page in the server's origin.

Uploads (``POST /items`` multipart) belong to the run that accepted them: they are written to
``RUN/uploads/`` and the item's media path is recorded as ``run:uploads/<name>`` (relative to the
run folder, so a copied run keeps its files; an id uploaded to one run is free in every other run of
the same corpus, and the files go when the run goes). Other media paths are relative to the corpus
root (or absolute inside it), as before.

Each upload is first written under a name unique to its request (``.<name>.<random>.part``), made
durable (fsync), then *claimed* under its final name with ``os.link``, which fails when the name
exists: of two concurrent uploads of one item id exactly one claims the name, and neither ever
removes a file it did not create.

Responses: a media type from ``INLINE_MEDIA_TYPES`` (images, audio, video, plain text) is sent as
itself; anything else (HTML, SVG, XML, scripts, unknown) as ``application/octet-stream`` with
``Content-Disposition: attachment``; every media response carries ``X-Content-Type-Options:
nosniff`` and a ``Content-Security-Policy`` with ``sandbox``, so even a file a browser opens
directly runs no script with the server's origin (where the search page keeps its state).
"""
from __future__ import annotations

import hashlib
import mimetypes
import os
import secrets
from pathlib import Path

from ace.data.corpus import resolve_media_file

RUN_PREFIX = "run:"              # media paths relative to the run folder (uploads)
UPLOADS = "uploads"              # RUN/uploads/
INLINE_MEDIA_TYPES = frozenset({
    "image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/tiff", "image/avif",
    "audio/wav", "audio/x-wav", "audio/wave", "audio/mpeg", "audio/ogg", "audio/flac", "audio/x-flac", "audio/mp4",
    "audio/aac", "audio/webm", "video/mp4", "video/webm", "video/ogg", "video/quicktime", "video/x-matroska",
    "text/plain",
})
MEDIA_CSP = "sandbox; default-src 'none'; img-src 'self' data:; media-src 'self'; style-src 'unsafe-inline'"


class MediaPathError(PermissionError):
    """A media path that resolves outside the folder it must stay in (corpus root or RUN/uploads)."""


class UploadError(ValueError):
    """An upload that cannot be stored (empty file)."""


class UploadExistsError(UploadError):
    """An upload's final file name is already taken (the item id already has an uploaded file)."""


def resolve_item_media(media: str, corpus_root: str | Path | None, run_dir: str | Path | None) -> Path:
    """Real path of an item's media file: ``run:uploads/...`` inside RUN/uploads, anything else inside the
    corpus root (symlinks resolved). MediaPathError when it escapes; ValueError when there is no such root."""
    if media.startswith(RUN_PREFIX):
        if run_dir is None:
            raise ValueError(f"media path {media!r} is relative to a run folder, and there is none")
        path, root = str(Path(run_dir) / media[len(RUN_PREFIX):]), Path(run_dir) / UPLOADS
    elif corpus_root is None:
        raise ValueError(f"media path {media!r} needs a corpus root, and this run has none")
    else:
        path, root = media, Path(corpus_root)
    try:
        return resolve_media_file(path, root)
    except PermissionError as exc:
        raise MediaPathError(str(exc)) from None


def upload_name(item_id: str, filename: str | None) -> str:
    """A safe file name for an upload: a hash of the item id + the original (sanitised) suffix."""
    suffix = Path(filename or "").suffix.lower()
    if not (1 < len(suffix) <= 10 and suffix[1:].isalnum()):
        suffix = ""
    return hashlib.sha1(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:20] + suffix


def upload_exists(run_dir: str | Path, name: str) -> bool:
    return (Path(run_dir) / UPLOADS / name).exists()


async def save_upload(upload, run_dir: str | Path, name: str, *, chunk_bytes: int = 1 << 20) -> tuple[Path, str]:
    """Write an uploaded file (starlette ``UploadFile``) durably into RUN/uploads under ``name``.

    Returns (the file's path, the item's media path ``run:uploads/<name>``). UploadExistsError when the
    name is taken (also by a concurrent upload that claimed it first); UploadError for an empty file.
    """
    folder = Path(run_dir) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    if final.exists():
        raise UploadExistsError(f"an uploaded file named {name} already exists in this run")
    tmp = folder / f".{name}.{secrets.token_hex(8)}.part"  # unique per request
    try:
        size = 0
        with open(tmp, "xb") as f:
            while chunk := await upload.read(chunk_bytes):
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            raise UploadError("file: the uploaded file is empty")
        try:
            os.link(tmp, final)  # atomic claim: fails if another request got the name first
        except FileExistsError:
            raise UploadExistsError(f"an uploaded file named {name} already exists in this run") from None
        _fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return final, f"{RUN_PREFIX}{UPLOADS}/{name}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def media_response_headers(path: Path) -> tuple[str, dict[str, str]]:
    """(media type, extra headers) for sending ``path`` from ``GET /media``."""
    kind, _ = mimetypes.guess_type(path.name)
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": MEDIA_CSP,
               "Cross-Origin-Resource-Policy": "same-origin"}
    if kind in INLINE_MEDIA_TYPES:
        return kind, headers
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.name)[:100] or "media"
    headers["Content-Disposition"] = f'attachment; filename="{safe}"'
    return "application/octet-stream", headers
