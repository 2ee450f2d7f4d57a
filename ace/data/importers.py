"""Readers for public caption files, and the caption-proxy split of ``../shared/data/README.md``.

Each reader yields ``CaptionedItem``s (item id, modality, captions, media file name) in file order:

| format      | file                                              | modality |
| ----------- | ------------------------------------------------- | -------- |
| karpathy    | Flickr30K / COCO JSON: [{image_name, captions}]    | image    |
| flickr8k    | Flickr8k.token.txt (``IMG.jpg#N<TAB>caption``)      | image    |
| clotho      | clotho_captions_*.csv (file_name, caption_1..5)   | audio    |
| audiocaps   | AudioCaps CSV (rows grouped by youtube_id+start)   | audio    |
| msvd        | MSVD_*.tsv (one video a line, captions ", "-joined) | video    |
| didemo      | DiDeMo_*.tsv (captions ", "-joined <TAB> video)    | video    |

Caption-proxy protocol: for every item with >= 5 captions, caption 1 is the item *document*
(its embedding stands in for the media embedding), captions 2-3 are the *generated queries*
(training), captions 4-5 are *test queries*.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("karpathy", "flickr8k", "clotho", "audiocaps", "msvd", "didemo")
MODALITY = {"karpathy": "image", "flickr8k": "image", "clotho": "audio", "audiocaps": "audio",
            "msvd": "video", "didemo": "video"}


class CaptionFileError(ValueError):
    """A caption file is missing, of an unknown format, or malformed; the message names it."""


@dataclass
class CaptionedItem:
    item_id: str
    modality: str
    captions: list[str]
    media: str | None = None  # file name as given by the data set (not guaranteed to exist)


@dataclass
class ProxySplit:
    """The caption-proxy split: one document per item, training and test queries."""
    item_ids: list[str]
    modalities: list[str]
    documents: list[str]                       # caption 1 of each item
    train_queries: list[tuple[str, str]]       # (item_id, caption 2|3)
    test_queries: list[tuple[str, str]]        # (item_id, caption 4|5)
    source: str = ""
    media: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)


def detect_format(path: str | Path) -> str:
    """Guess the caption-file format from its name and first bytes."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".json"):
        return "karpathy"
    if "token" in name and name.endswith(".txt"):
        return "flickr8k"
    if name.endswith(".tsv"):
        return "didemo" if "didemo" in name else "msvd"
    if name.endswith(".csv"):
        with open(path, encoding="utf-8") as fh:
            header = fh.readline().strip().lower()
        if header.startswith("file_name") and "caption_1" in header:
            return "clotho"
        if "audiocap_id" in header:
            return "audiocaps"
    raise CaptionFileError(f"cannot tell the caption format of {path}; pass fmt= one of {', '.join(FORMATS)}")


def read_captions(path: str | Path, fmt: str | None = None, *, split_list: str | Path | None = None,
                  limit: int | None = None) -> list[CaptionedItem]:
    """Read a caption file into items (file order). ``split_list``: Flickr8k image-name list."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"caption file not found: {path}")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise CaptionFileError(f"unknown caption format '{fmt}'; known: {', '.join(FORMATS)}")
    try:
        items = _READERS[fmt](path)
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, KeyError, IndexError) as exc:
        raise CaptionFileError(f"malformed {fmt} caption file {path}: {exc!r}") from None
    if split_list is not None:
        keep = {ln.strip() for ln in Path(split_list).read_text().splitlines() if ln.strip()}
        items = [it for it in items if it.item_id in keep]
    if not items:
        raise CaptionFileError(f"no items found in {path} (format {fmt})")
    return items[:limit] if limit else items


def _clean(captions) -> list[str]:
    return [c.strip() for c in captions if c and c.strip()]


def _read_karpathy(path: Path) -> list[CaptionedItem]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "images" in data:  # original Karpathy dataset_*.json layout
        data = [{"image_name": d["filename"], "captions": [s["raw"] for s in d["sentences"]]} for d in data["images"]]
    return [CaptionedItem(d["image_name"], "image", _clean(d["captions"]), d["image_name"]) for d in data]


def _read_flickr8k(path: Path) -> list[CaptionedItem]:
    by_image: dict[str, list[str]] = {}
    for ln in path.read_text(encoding="utf-8").splitlines():
        if not ln.strip():
            continue
        key, caption = ln.split("\t", 1)
        by_image.setdefault(key.split("#")[0], []).append(caption)
    return [CaptionedItem(k, "image", _clean(v), k) for k, v in by_image.items()]


def _read_clotho(path: Path) -> list[CaptionedItem]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [CaptionedItem(r["file_name"], "audio", _clean(r[f"caption_{i}"] for i in range(1, 6)), r["file_name"])
            for r in rows]


def _read_audiocaps(path: Path) -> list[CaptionedItem]:
    by_clip: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            by_clip.setdefault(f"{r['youtube_id']}_{r['start_time']}", []).append(r["caption"])
    return [CaptionedItem(k, "audio", _clean(v), None) for k, v in by_clip.items()]


def _split_joined(text: str) -> list[str]:
    return _clean(text.split(", "))


def _read_msvd(path: Path) -> list[CaptionedItem]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [CaptionedItem(f"{path.stem}:{i}", "video", _split_joined(ln), None) for i, ln in enumerate(lines)]


def _read_didemo(path: Path) -> list[CaptionedItem]:
    # Tab-separated with CSV quoting: a quoted caption field may hold newlines.
    items = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != 2:
                raise CaptionFileError(f"{path}: expected 'captions<TAB>video', got {len(row)} fields: {row[:1]}")
            captions, video = row
            items.append(CaptionedItem(video.strip(), "video", _split_joined(captions.replace("\n", " ")), video.strip()))
    return items


_READERS = {"karpathy": _read_karpathy, "flickr8k": _read_flickr8k, "clotho": _read_clotho,
            "audiocaps": _read_audiocaps, "msvd": _read_msvd, "didemo": _read_didemo}


def caption_proxy_split(items: list[CaptionedItem], *, source: str = "", min_captions: int = 5) -> ProxySplit:
    """Apply the caption-proxy protocol: doc = caption 1, train = 2-3, test = 4-5."""
    split = ProxySplit([], [], [], [], [], source=source)
    seen: set[str] = set()
    for it in items:
        if len(it.captions) < min_captions:
            continue
        if it.item_id in seen:
            raise CaptionFileError(f"duplicate item id '{it.item_id}' in {source or 'caption file'}")
        seen.add(it.item_id)
        split.item_ids.append(it.item_id)
        split.modalities.append(it.modality)
        split.media.append(it.media)
        split.documents.append(it.captions[0])
        split.train_queries += [(it.item_id, q) for q in it.captions[1:3]]
        split.test_queries += [(it.item_id, q) for q in it.captions[3:5]]
    if not split.item_ids:
        raise CaptionFileError(f"no item in {source or 'the caption file'} has {min_captions} captions")
    return split


def load_proxy_split(path: str | Path, fmt: str | None = None, **kw) -> ProxySplit:
    """Read a caption file and return its caption-proxy split."""
    return caption_proxy_split(read_captions(path, fmt, **kw), source=str(path))
