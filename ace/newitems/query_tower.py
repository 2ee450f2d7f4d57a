"""Query tower: maps query text into the item-embedding space (the "DT trained" dual tower).

Two kinds, one interface (``encode(texts) -> float32 (Q, D)``, L2-normalised):

- *dual encoder*: the item encoder has its own text tower (CLIP/CLAP); it is used as is.
- *projected*: a frozen text encoder (default all-MiniLM-L6-v2, 384-d) plus a projection
  (Linear or a small MLP) to the item dimension D, trained with InfoNCE on (query, item) pairs:
  the item's embedding is the positive, the other items of the batch are the negatives.
  The frozen text embeddings are computed once, so training only touches the projection.

    tower = QueryTower(config=QueryTowerConfig(), text_encoder=TextEncoder(), item_dim=384)
    tower.fit(train_pairs, item_ids, item_embeddings)      # pairs: [(item_id, query), ...]
    q = tower.encode(["a dog runs on the beach"])          # (1, 384)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ace.arrays import check_matrix, resolve_device, unit_rows
from ace.config import ConfigError, from_dict, to_dict

FORMAT_VERSION = 1


class QueryTowerError(ValueError):
    """Bad input to the query tower (dimension mismatch, empty pairs, unknown item id, bad file)."""


class TextTower(Protocol):
    """Anything with ``encode(list[str]) -> np.ndarray (N, D)`` (e.g. ace.data.encoders.TextEncoder)."""

    def encode(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class QueryTowerConfig:
    text_encoder: str = "all-MiniLM-L6-v2"  # frozen text encoder (name or local path)
    projection: str = "linear"              # "linear" | "mlp"
    hidden: int = 1024                      # MLP hidden width
    init_identity: bool = True              # linear projection starts as identity when dims match
    temperature: float = 0.05               # initial InfoNCE temperature
    learn_temperature: bool = True
    negatives: str = "in_batch"             # "in_batch" | "all_items" (every item is a negative)
    symmetric: bool = False                 # add the item -> query direction (in-batch only)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"                    # "auto" | "cpu" | "cuda"

    def __post_init__(self):
        if self.projection not in ("linear", "mlp"):
            raise ValueError(f"projection must be 'linear' or 'mlp', got {self.projection!r}")
        if self.negatives not in ("in_batch", "all_items"):
            raise ValueError(f"negatives must be 'in_batch' or 'all_items', got {self.negatives!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 for in-batch negatives, got {self.batch_size}")
        if self.epochs < 0 or self.lr <= 0 or self.hidden < 1:
            raise ValueError("epochs must be >= 0, lr > 0 and hidden >= 1")


def item_plus_query_vectors(item_vectors: np.ndarray, item_ids: list[str], query_vectors: np.ndarray,
                            query_item_ids: list[str]) -> np.ndarray:
    """Item vectors (N, D) = normalised mean of each item's unit vector and its queries' unit vectors.

    ``query_item_ids[j]`` names the item of ``query_vectors[j]``; an item without queries keeps its
    own (unit) vector. The one owner of the "document + queries" vector: the DT document+queries
    baseline (ace/bench/baselines.py) and the query-aware identifiers (``identifiers.vectors:
    item_plus_queries``, ace/pipeline/stages.py) use it."""
    item_vectors, query_vectors = np.asarray(item_vectors), np.asarray(query_vectors)
    if item_vectors.ndim != 2 or query_vectors.ndim != 2 or item_vectors.shape[1] != query_vectors.shape[1]:
        raise ValueError(f"item vectors {item_vectors.shape} and query vectors {query_vectors.shape} must be "
                         f"2-D with the same dimension (the query encoder must share the item space)")
    if len(item_ids) != len(item_vectors) or len(query_item_ids) != len(query_vectors):
        raise ValueError(f"{len(item_ids)} item ids for {len(item_vectors)} item vectors, "
                         f"{len(query_item_ids)} query item ids for {len(query_vectors)} query vectors")
    if not (np.isfinite(item_vectors).all() and np.isfinite(query_vectors).all()):
        raise ValueError("item or query vectors contain NaN or inf")
    row = {iid: i for i, iid in enumerate(item_ids)}
    total = unit_rows(item_vectors).astype(np.float64)
    count = np.ones(len(total))
    tq = unit_rows(query_vectors)
    for j, iid in enumerate(query_item_ids):
        if iid not in row:
            raise ValueError(f"query {j} names unknown item '{iid}'")
        total[row[iid]] += tq[j]
        count[row[iid]] += 1
    return unit_rows((total / count[:, None]).astype(np.float32))


def one_cycle(opt: torch.optim.Optimizer, *, max_lr: float, total_steps: int, pct_start: float = 0.1):
    """OneCycleLR for any step count: its warm-up phase ends at step ``pct_start * total_steps - 1``,
    which must be >= 1 (0 divides by zero, < 0 extrapolates), so short runs get a longer warm-up
    share; under 3 steps the learning rate is constant."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if total_steps < 3:
        for group in opt.param_groups:
            group["lr"] = max_lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    pct_start = max(pct_start, 2.0 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)


def info_nce(q: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, log_scale: torch.Tensor,
             *, same_item: torch.Tensor | None = None, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE of unit vectors q (B, D) against items (C, D); targets (B,) index the positive column.

    ``same_item`` (B, C) bool marks columns that hold the query's own item besides the target
    (duplicates in the batch); they are masked out rather than counted as negatives.
    ``symmetric`` adds the item -> query direction over the batch's own items: each column's
    positives are all the rows whose target it is (several when an item has several queries).
    """
    raw = log_scale.exp() * q @ items.T  # (B, C)
    logits = raw
    if same_item is not None:
        pos = F.one_hot(targets, raw.shape[1]).bool()
        logits = raw.masked_fill(same_item & ~pos, float("-inf"))
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        pos_t = targets[None, :] == torch.arange(raw.shape[1], device=q.device)[:, None]  # (C, B)
        if not pos_t.any(dim=1).all():
            raise ValueError("symmetric InfoNCE needs every item column to be some query's target")
        lsm = F.log_softmax(raw.T, dim=1)                                                  # (C, B)
        loss_t = -torch.logsumexp(lsm.masked_fill(~pos_t, float("-inf")), dim=1)           # (C,)
        loss = 0.5 * (loss + loss_t.mean())
    return loss


class Projection(nn.Module):
    """Linear or 2-layer MLP from the text dimension to the item dimension."""

    def __init__(self, *, in_dim: int, out_dim: int, kind: str = "linear", hidden: int = 1024,
                 init_identity: bool = True):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
            if init_identity and in_dim == out_dim:
                nn.init.eye_(self.net.weight)
                nn.init.zeros_(self.net.bias)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.skip = kind == "mlp" and in_dim == out_dim and init_identity
        if self.skip:  # residual MLP starting at the identity map
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in_dim) -> (N, out_dim), unit norm
        y = self.net(x) + (x if self.skip else 0.0)
        return F.normalize(y, dim=-1)


def _check_matrix(name: str, x: np.ndarray, dim: int | None = None) -> np.ndarray:
    return check_matrix(x, dim=dim, name=name, error=QueryTowerError)


class _TextsAdapter:
    """``encode(texts)`` over an item encoder's ``encode_texts`` (its text tower)."""

    def __init__(self, item_encoder):
        self.item_encoder = item_encoder
        self.dim = int(item_encoder.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.item_encoder.encode_texts(list(texts))


class QueryTower:
    """Text -> item-embedding space: a dual encoder's text tower, or frozen encoder + projection."""

    def __init__(self, *, config: QueryTowerConfig | None = None, text_encoder: TextTower | None = None,
                 item_dim: int | None = None, dual_encoder: TextTower | None = None):
        self.config = config or QueryTowerConfig()
        self.device = resolve_device(self.config.device, error=QueryTowerError)
        self.dual_encoder = dual_encoder
        self.projection: Projection | None = None
        self.log_scale = torch.tensor(math.log(1.0 / self.config.temperature))
        self.history: list[dict] = []
        if dual_encoder is not None:
            if text_encoder is not None:
                raise QueryTowerError("give either dual_encoder (its own text tower) or text_encoder, not both")
            self.text_encoder = dual_encoder
            self.item_dim = item_dim
            return
        if text_encoder is None:
            from ace.data.encoders import TextEncoder
            text_encoder = TextEncoder(self.config.text_encoder)
        if item_dim is None or item_dim < 1:
            raise QueryTowerError("a projected query tower needs item_dim (the item-embedding dimension)")
        self.text_encoder = text_encoder
        self.item_dim = int(item_dim)
        self.text_dim = int(getattr(text_encoder, "dim", 0) or text_encoder.encode(["dimension probe"]).shape[1])
        torch.manual_seed(self.config.seed)
        self.projection = Projection(in_dim=self.text_dim, out_dim=self.item_dim, kind=self.config.projection,
                                     hidden=self.config.hidden, init_identity=self.config.init_identity).to(self.device)

    @classmethod
    def for_item_encoder(cls, item_encoder, *, config: QueryTowerConfig | None = None,
                         text_encoder: TextTower | None = None) -> "QueryTower":
        """The dual encoder's own text tower when the item encoder has one (``encode_texts``,
        e.g. ace.data.encoders.HFDualEncoder), else a frozen text encoder + projection to its dim."""
        if callable(getattr(item_encoder, "encode_texts", None)):
            return cls(config=config, dual_encoder=_TextsAdapter(item_encoder), item_dim=int(item_encoder.dim))
        return cls(config=config, text_encoder=text_encoder, item_dim=int(item_encoder.dim))

    @property
    def is_dual(self) -> bool:
        return self.dual_encoder is not None

    # ------------------------------------------------------------------ encoding
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Frozen text embeddings (N, text_dim) — cache these and pass them to fit()/project()."""
        if isinstance(texts, str):
            raise QueryTowerError("pass a list of query strings, not a single string")
        emb = np.asarray(self.text_encoder.encode(list(texts)), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise QueryTowerError(f"text encoder returned shape {emb.shape} for {len(texts)} texts")
        return emb

    @torch.no_grad()
    def project(self, text_emb: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
        """Frozen text embeddings (N, text_dim) -> unit query vectors (N, D)."""
        if self.projection is None:
            return unit_rows(_check_matrix("query embeddings", text_emb, self.item_dim))
        x = _check_matrix("text embeddings", text_emb, self.text_dim)
        self.projection.eval()
        out = [self.projection(torch.from_numpy(x[i:i + batch_size]).to(self.device)).cpu().numpy()
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.item_dim), np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Query texts -> unit vectors (Q, D) in the item-embedding space."""
        return self.project(self.embed_text(texts))

    # ------------------------------------------------------------------ training
    def fit(self, pairs: Sequence[tuple[str, str]], item_ids: Sequence[str], item_embeddings: np.ndarray, *,
            text_emb: np.ndarray | None = None, progress: bool = False) -> list[dict]:
        """Train the projection with InfoNCE on (item_id, query) pairs; returns per-epoch loss history.

        ``text_emb`` (len(pairs), text_dim): precomputed frozen embeddings of the pair queries.
        """
        if self.is_dual:
            raise QueryTowerError("a dual-encoder query tower is not trained; use the encoder's text tower as is")
        if len(pairs) == 0:
            raise QueryTowerError("fit() needs at least one (item_id, query) pair")
        items = _check_matrix("item embeddings", item_embeddings, self.item_dim)
        if len(item_ids) != len(items):
            raise QueryTowerError(f"{len(item_ids)} item ids but {len(items)} item embeddings")
        row = {iid: i for i, iid in enumerate(item_ids)}
        if len(row) != len(item_ids):
            raise QueryTowerError("item_ids contain duplicates")
        unknown = [iid for iid, _ in pairs if iid not in row]
        if unknown:
            raise QueryTowerError(f"{len(unknown)} pair(s) name unknown item ids, e.g. {unknown[:3]}")
        if text_emb is None:
            text_emb = self.embed_text([q for _, q in pairs])
        text_emb = _check_matrix("text embeddings", text_emb, self.text_dim)
        if len(text_emb) != len(pairs):
            raise QueryTowerError(f"text_emb has {len(text_emb)} rows for {len(pairs)} pairs")

        cfg, dev = self.config, self.device
        g = torch.Generator().manual_seed(cfg.seed)
        x_all = torch.from_numpy(text_emb).to(dev)                             # (P, text_dim)
        item_all = F.normalize(torch.from_numpy(items).to(dev), dim=-1)        # (N, D)
        tgt_all = torch.tensor([row[iid] for iid, _ in pairs], device=dev)     # (P,)
        log_scale = nn.Parameter(self.log_scale.clone().to(dev), requires_grad=cfg.learn_temperature)
        params = list(self.projection.parameters()) + ([log_scale] if cfg.learn_temperature else [])
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = max(1, math.ceil(len(pairs) / cfg.batch_size)) * max(cfg.epochs, 1)
        sched = one_cycle(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
        epochs = range(cfg.epochs)
        if progress:
            from tqdm.auto import tqdm
            epochs = tqdm(epochs, desc="query tower")
        self.projection.train()
        for epoch in epochs:
            perm = torch.randperm(len(pairs), generator=g).to(dev)
            total, n = 0.0, 0
            for s in range(0, len(perm), cfg.batch_size):
                b = perm[s:s + cfg.batch_size]
                if len(b) < 2 and cfg.negatives == "in_batch":
                    continue
                q = self.projection(x_all[b])                                  # (B, D)
                tgt = tgt_all[b]
                if cfg.negatives == "all_items":
                    loss = info_nce(q, item_all, tgt, log_scale)
                else:
                    uniq, local = torch.unique(tgt, return_inverse=True)        # (C,), (B,)
                    same = tgt[:, None] == uniq[None, :]                        # (B, C)
                    loss = info_nce(q, item_all[uniq], local, log_scale, same_item=same,
                                    symmetric=cfg.symmetric)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    log_scale.clamp_(0.0, math.log(100.0))
                total += loss.item() * len(b)
                n += len(b)
            self.history.append({"epoch": epoch, "loss": total / max(n, 1),
                                 "temperature": float(torch.exp(-log_scale.detach()))})
        self.log_scale = log_scale.detach().cpu()
        self.projection.eval()
        return self.history

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Folder with meta.json (config, dims) and projection.pt; a dual tower saves only its meta."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "kind": "dual" if self.is_dual else "projected",
                "config": to_dict(self.config), "item_dim": self.item_dim,
                "text_dim": getattr(self, "text_dim", None), "log_scale": float(self.log_scale),
                "history": self.history}
        if self.projection is not None:
            torch.save({k: v.cpu() for k, v in self.projection.state_dict().items()}, path / "projection.pt")
        (path / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path, *, text_encoder: TextTower | None = None,
             dual_encoder: TextTower | None = None) -> "QueryTower":
        """Rebuild a saved tower; the text encoder is rebuilt from the config unless given."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise QueryTowerError(f"no query tower at {path} (meta.json missing)")
        try:
            meta = json.loads((path / "meta.json").read_text())
            cfg = from_dict(QueryTowerConfig, meta["config"])
        except (json.JSONDecodeError, KeyError, ConfigError) as exc:
            raise QueryTowerError(f"corrupt query tower meta.json at {path}: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise QueryTowerError(f"query tower at {path} has format {meta.get('format_version')}, "
                                  f"expected {FORMAT_VERSION}")
        if meta["kind"] == "dual":
            if dual_encoder is None:
                raise QueryTowerError(f"query tower at {path} is a dual encoder's text tower: pass dual_encoder=")
            tower = cls(config=cfg, dual_encoder=dual_encoder, item_dim=meta["item_dim"])
        else:
            tower = cls(config=cfg, text_encoder=text_encoder, item_dim=meta["item_dim"])
            if tower.text_dim != meta["text_dim"]:
                raise QueryTowerError(f"text encoder gives {tower.text_dim}-d vectors, the saved projection "
                                      f"expects {meta['text_dim']}-d")
            try:
                state = torch.load(path / "projection.pt", map_location=tower.device, weights_only=True)
                tower.projection.load_state_dict(state)
            except (FileNotFoundError, RuntimeError, EOFError) as exc:
                raise QueryTowerError(f"cannot load projection weights from {path}: {exc}") from None
            tower.projection.eval()
        tower.log_scale = torch.tensor(meta["log_scale"])
        tower.history = meta.get("history", [])
        return tower


class RunTextTower:
    """A dual encoder's text tower mapped into a run's item space (the run's fixed modality projection)."""

    def __init__(self, encoder, projection):
        self.encoder, self.projection = encoder, projection
        self.dim = int(projection.d_out)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.projection(np.asarray(self.encoder.encode_texts(list(texts)), dtype=np.float32))


def run_text_tower(encoder_config, modalities: Sequence[str]) -> RunTextTower | None:
    """The item encoder's own text tower when the run's items all come from one dual encoder (CLIP/CLAP,
    kind "hf") whose space the text can share; None otherwise (frozen text encoder + trained projection).

    Several modalities share one text tower only when their projection to the common dimension is the
    identity (each modality gets its own seeded projection otherwise).
    """
    from ace.data.encoders import ModalityProjection, build_encoder

    modalities = sorted(set(modalities))
    subs = [getattr(encoder_config, m) for m in modalities]
    if not subs or any(s.kind != "hf" for s in subs) or len({s.name_or_path for s in subs}) != 1:
        return None
    encoder = build_encoder(subs[0])
    d_out = encoder_config.dim or encoder.dim
    if len(modalities) > 1 and d_out != encoder.dim:
        return None
    return RunTextTower(encoder, ModalityProjection(encoder.dim, d_out, kind=encoder_config.projection,
                                                    seed=encoder_config.seed, modality=modalities[0]))
