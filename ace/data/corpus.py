"""The corpus: a table of items (id, modality, media path or precomputed embedding, captions, metadata).

A corpus file is JSONL, CSV or Parquet (read through ``datasets``), one item a row:

| column      | type                         | required                                   |
| ----------- | ---------------------------- | ------------------------------------------ |
| item_id     | str, unique                  | yes                                        |
| modality    | image / audio / video / text | yes                                        |
| media       | path (relative to the corpus file's folder, or absolute) | one of media / embedding (text: or captions) |
| embedding   | list of floats               | one of media / embedding                   |
| captions    | list of str (CSV: a JSON list) | no                                       |
| metadata    | mapping (CSV: a JSON object) | no; any other column is put into metadata  |

One corpus may mix modalities. Caption files of public data sets (``ace.data.importers``) become a
corpus with ``corpus_from_captions``; ``load_corpus`` accepts either kind of file.

    corpus = load_corpus("data/demo/corpus.jsonl")      # validated: clear errors naming the rows
    split = corpus.proxy_split()                         # caption-proxy protocol (ace.data.importers)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ace.data.importers import CaptionedItem, ProxySplit, caption_proxy_split, detect_format, read_captions

MODALITIES = ("image", "audio", "video", "text")
TABLE_SUFFIXES = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
CORE_COLUMNS = ("item_id", "modality", "media", "embedding", "captions", "metadata")
MAX_LISTED_ROWS = 10


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and the offending rows."""


@dataclass
class CorpusItem:
    item_id: str
    modality: str                       # one of MODALITIES
    media: str | None = None            # path, relative to the corpus root or absolute
    embedding: np.ndarray | None = None # precomputed item embedding (D,), if any
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def description(self) -> str | None:
        """Text that stands for the item: metadata['text'], else its first caption (the caption-proxy document)."""
        text = self.metadata.get("text") if self.metadata else None
        if text:
            return str(text)
        return self.captions[0] if self.captions else None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"item_id": self.item_id, "modality": self.modality}
        if self.media is not None:
            out["media"] = self.media
        if self.embedding is not None:
            out["embedding"] = [float(x) for x in np.asarray(self.embedding, dtype=np.float32)]
        if self.captions:
            out["captions"] = list(self.captions)
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out


def _rows_message(problem: str, rows: list[tuple[int, str]], where: str) -> str:
    listed = ", ".join(f"row {i} ({detail})" for i, detail in rows[:MAX_LISTED_ROWS])
    more = f" and {len(rows) - MAX_LISTED_ROWS} more" if len(rows) > MAX_LISTED_ROWS else ""
    return f"{problem} in {where}: {listed}{more}"


@dataclass
class Corpus:
    """A table of CorpusItems; ``root`` resolves relative media paths."""
    items: list[CorpusItem]
    root: Path | None = None
    source: str = ""

    def __post_init__(self):
        self.root = Path(self.root) if self.root is not None else None
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[CorpusItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> CorpusItem:
        return self.items[i]

    @property
    def item_ids(self) -> list[str]:
        return [it.item_id for it in self.items]

    @property
    def modalities(self) -> list[str]:
        return [it.modality for it in self.items]

    def index_of(self, item_id: str) -> int:
        if self._index is None or len(self._index) != len(self.items):
            self._index = {it.item_id: i for i, it in enumerate(self.items)}
        if item_id not in self._index:
            raise KeyError(f"unknown item id {item_id!r} in corpus {self.source or '(in memory)'}")
        return self._index[item_id]

    def get(self, item_id: str) -> CorpusItem:
        return self.items[self.index_of(item_id)]

    def by_modality(self) -> dict[str, list[int]]:
        """Row indices of each modality present, in corpus order."""
        out: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            out.setdefault(it.modality, []).append(i)
        return out

    def subset(self, item_ids: list[str]) -> "Corpus":
        return Corpus([self.get(i) for i in item_ids], root=self.root, source=self.source)

    def media_path(self, item: CorpusItem) -> Path | None:
        """Absolute path of an item's media file (None when the item has no media)."""
        return resolve_media(item, self.root)

    def validate(self, *, check_media: bool = True) -> "Corpus":
        """Raise CorpusError listing every problem with the rows that have it; return self when clean."""
        where = self.source or "corpus"
        if not self.items:
            raise CorpusError(f"empty corpus: {where} has no items")
        problems: list[str] = []
        bad: dict[str, list[tuple[int, str]]] = {}

        def flag(kind: str, i: int, it: CorpusItem, extra: str = ""):
            bad.setdefault(kind, []).append((i, f"item_id {it.item_id!r}" + (f", {extra}" if extra else "")))

        first_row: dict[str, int] = {}
        dims: dict[int, list[tuple[int, str]]] = {}
        for i, it in enumerate(self.items):
            if not isinstance(it.item_id, str) or not it.item_id.strip():
                flag("empty item_id", i, it)
            elif it.item_id in first_row:
                flag("duplicate item ids", i, it, f"first at row {first_row[it.item_id]}")
            else:
                first_row[it.item_id] = i
            if it.modality not in MODALITIES:
                flag(f"unknown modality (known: {', '.join(MODALITIES)})", i, it, f"modality {it.modality!r}")
            if any((not isinstance(c, str)) or not c.strip() for c in it.captions):
                flag("empty captions", i, it)
            if it.embedding is not None:
                emb = np.asarray(it.embedding)
                if emb.ndim != 1 or emb.size == 0:
                    flag("embedding is not a non-empty 1-D vector", i, it)
                else:
                    if not np.all(np.isfinite(emb)):
                        flag("NaN or infinite embedding values", i, it)
                    dims.setdefault(int(emb.shape[0]), []).append((i, f"item_id {it.item_id!r}, dim {emb.shape[0]}"))
            elif it.media is None and not it.description():
                flag("no media, no embedding and no caption or metadata['text'] to encode", i, it)
            if check_media and it.media is not None and it.embedding is None:
                path = resolve_media(it, self.root)
                if not path.is_file():
                    flag("missing media files", i, it, str(path))
        if len(dims) > 1:
            common = max(dims, key=lambda d: len(dims[d]))
            rows = sorted(r for d, rs in dims.items() if d != common for r in rs)
            problems.append(_rows_message(f"mixed embedding dimensions {sorted(dims)} (most rows have {common})",
                                          rows, where))
        for kind, rows in bad.items():
            problems.append(_rows_message(kind, rows, where))
        if problems:
            raise CorpusError("; ".join(problems))
        return self

    def save_jsonl(self, path: str | Path) -> Path:
        """Write the corpus as JSONL (media paths as stored: relative paths stay relative to ``root``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for it in self.items:
                fh.write(json.dumps(it.to_dict(), ensure_ascii=False) + "\n")
        tmp.replace(path)
        return path

    def to_captioned(self) -> list[CaptionedItem]:
        return [CaptionedItem(it.item_id, it.modality, list(it.captions), it.media) for it in self.items]

    def proxy_split(self, *, min_captions: int = 5) -> ProxySplit:
        """Caption-proxy split (doc = caption 1, train = 2-3, test = 4-5) via ace.data.importers."""
        return caption_proxy_split(self.to_captioned(), source=self.source, min_captions=min_captions)


def resolve_media(item: CorpusItem, root: Path | None) -> Path | None:
    if item.media is None:
        return None
    p = Path(item.media).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    return p


def resolve_media_file(media: str, root: Path) -> Path:
    """Real path of an item's media file; PermissionError when it resolves outside ``root``."""
    root_real = Path(os.path.realpath(root))
    p = Path(media)
    real = Path(os.path.realpath(p if p.is_absolute() else root_real / p))
    if real != root_real and root_real not in real.parents:
        raise PermissionError(f"media path {media!r} resolves outside the corpus root {root_real}")
    return real


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _parse_json_cell(value, name: str, row: int, path: Path):
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            raise CorpusError(f"{path}: row {row}: column '{name}' is not valid JSON: {s[:60]!r}") from None
    return value


def _row_to_item(row: dict, i: int, path: Path) -> CorpusItem:
    if _is_missing(row.get("item_id")):
        raise CorpusError(f"{path}: row {i} has no item_id")
    if _is_missing(row.get("modality")):
        raise CorpusError(f"{path}: row {i} (item_id {row['item_id']!r}) has no modality")
    captions = _parse_json_cell(row.get("captions"), "captions", i, path)
    if captions is None:  # CSV alternative: caption_1..caption_N columns
        numbered = sorted((k for k in row if k.startswith("caption_") and k[8:].isdigit()), key=lambda k: int(k[8:]))
        captions = [row[k] for k in numbered if not _is_missing(row[k]) and str(row[k]).strip()]
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list):
        raise CorpusError(f"{path}: row {i} (item_id {row['item_id']!r}): captions must be a list of strings")
    embedding = _parse_json_cell(row.get("embedding"), "embedding", i, path)
    if embedding is not None:
        try:
            embedding = np.asarray(embedding, dtype=np.float32)
        except (TypeError, ValueError):
            raise CorpusError(f"{path}: row {i} (item_id {row['item_id']!r}): embedding is not a list of numbers") from None
    metadata = _parse_json_cell(row.get("metadata"), "metadata", i, path) or {}
    if not isinstance(metadata, dict):
        raise CorpusError(f"{path}: row {i} (item_id {row['item_id']!r}): metadata must be a mapping")
    metadata = {k: v for k, v in metadata.items() if v is not None}  # Arrow fills absent struct keys with None
    for k, v in row.items():
        if k not in CORE_COLUMNS and not k.startswith("caption_") and not _is_missing(v):
            metadata.setdefault(k, v)
    media = row.get("media")
    return CorpusItem(item_id=str(row["item_id"]), modality=str(row["modality"]).strip().lower(),
                      media=None if _is_missing(media) or not str(media).strip() else str(media),
                      embedding=embedding, captions=[c if isinstance(c, str) else str(c) for c in captions],
                      metadata=metadata)


def _is_table_csv(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        header = [h.strip().lower() for h in fh.readline().split(",")]
    return "item_id" in header


def load_corpus(path: str | Path, *, root: str | Path | None = None, validate: bool = True,
                check_media: bool = True, fmt: str | None = None) -> Corpus:
    """Read a corpus table (JSONL / CSV / Parquet via ``datasets``) or a public caption file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    suffix = path.suffix.lower()
    if fmt is not None or suffix not in TABLE_SUFFIXES or (suffix == ".csv" and not _is_table_csv(path)):
        return corpus_from_captions(path, fmt, media_root=root, check_media=check_media and root is not None)
    if path.stat().st_size == 0:
        raise CorpusError(f"empty corpus: {path} is an empty file")
    import datasets

    try:
        table = datasets.load_dataset(TABLE_SUFFIXES[suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for malformed files; name the file
        raise CorpusError(f"cannot read corpus {path} as {suffix[1:]}: {type(exc).__name__}: {exc}") from None
    missing = [c for c in ("item_id", "modality") if c not in table.column_names]
    if missing:
        raise CorpusError(f"corpus {path} lacks column(s) {', '.join(missing)}; has {', '.join(table.column_names)}")
    items = [_row_to_item(row, i, path) for i, row in enumerate(table)]
    corpus = Corpus(items, root=Path(root) if root is not None else path.resolve().parent, source=str(path))
    return corpus.validate(check_media=check_media) if validate else corpus


def corpus_from_captions(caption_file: str | Path, fmt: str | None = None, *, media_root: str | Path | None = None,
                         split_list: str | Path | None = None, limit: int | None = None,
                         check_media: bool = False) -> Corpus:
    """A corpus from any caption file ``ace.data.importers`` reads (Karpathy JSON, Flickr8k, Clotho, ...).

    Media file names are kept as the data set gives them, relative to ``media_root``; set
    ``check_media=True`` (with a ``media_root``) to require that the files exist.
    """
    caption_file = Path(caption_file)
    fmt = fmt or detect_format(caption_file)
    captioned = read_captions(caption_file, fmt, split_list=split_list, limit=limit)
    items = [CorpusItem(item_id=c.item_id, modality=c.modality, media=c.media, captions=list(c.captions))
             for c in captioned]
    corpus = Corpus(items, root=Path(media_root) if media_root is not None else None, source=str(caption_file))
    return corpus.validate(check_media=check_media)
