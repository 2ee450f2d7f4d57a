"""Semantic-preserving binary hash codes and a faiss binary index with float re-ranking.

``HashHead`` is a learned head (Linear or small MLP) whose output signs are the B bits of a code.
A linear head starts as random hyperplanes (SimHash) and is trained so that Hamming distance
tracks embedding similarity: on random batches of vectors, the scaled inner products of the
tanh-relaxed codes, ``h_i . h_j / B`` (equal to ``1 - 2 * hamming / B`` for exact codes), are
regressed onto the angular similarity ``1 - 2 * angle / pi`` of the float vectors (the value
random hyperplanes give in expectation), plus a quantisation term (|h| -> 1) and a bit-balance
term (each bit set half the time).

``BinaryIndex`` keeps packed codes (uint8, B/8 bytes per item) in a faiss binary index (flat,
HNSW or IVF) under int64 ids: flat and HNSW are wrapped in ``IndexBinaryIDMap2``, IVF stores the
ids itself; HNSW cannot delete, so removed ids are tombstoned, filtered out of results and the
graph is rebuilt once they exceed ``rebuild_ratio``. It also keeps the float embeddings, so the
Hamming candidates are re-ranked by exact cosine.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ace.config import ConfigError, from_dict, to_dict
from ace.arrays import check_matrix, resolve_device, unit_rows

FORMAT_VERSION = 1


class HashingError(ValueError):
    """Bad input to the hash head or binary index (shapes, NaN, unknown/duplicate ids, bad files)."""


def check_embeddings(x, dim: int | None = None, name: str = "embeddings") -> np.ndarray:
    """ace.arrays.check_matrix with HashingError: float32 (N, D), finite."""
    return check_matrix(x, dim=dim, name=name, error=HashingError)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """ace.arrays.unit_rows with HashingError (an all-zero row has no direction)."""
    return unit_rows(x, error=HashingError)


# ---------------------------------------------------------------------------------- hash head
@dataclass
class HashConfig:
    bits: int = 128            # code length B (multiple of 8; 64-256 typical)
    hidden: int = 0            # 0 = linear head, else MLP hidden width
    steps: int = 500           # optimiser steps, each on a random batch of embeddings
    batch_size: int = 512      # embeddings per batch; every pair inside the batch is used
    lr: float = 1e-2
    quant_weight: float = 0.01  # pushes tanh(h) towards +-1
    balance_weight: float = 0.1  # pushes each bit's mean towards 0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.bits < 8 or self.bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8, got {self.bits}")
        if self.batch_size < 2 or self.steps < 0 or self.lr <= 0 or self.hidden < 0:
            raise ValueError("batch_size must be >= 2, steps >= 0, lr > 0, hidden >= 0")


def hash_loss(h: torch.Tensor, target_sim: torch.Tensor, *, quant_weight: float, balance_weight: float
              ) -> tuple[torch.Tensor, dict]:
    """Similarity-preserving loss of relaxed codes h (N, B) in [-1, 1] against cosine sims (N, N)."""
    n, bits = h.shape
    code_sim = h @ h.T / bits                                   # (N, N) = 1 - 2 * hamming / B when exact
    off = ~torch.eye(n, dtype=torch.bool, device=h.device)
    sim = F.mse_loss(code_sim[off], angular_similarity(target_sim[off]))
    quant = (h.abs() - 1.0).pow(2).mean()
    balance = h.mean(0).pow(2).mean()
    loss = sim + quant_weight * quant + balance_weight * balance
    return loss, {"sim": sim.item(), "quant": quant.item(), "balance": balance.item()}


def angular_similarity(cos: torch.Tensor) -> torch.Tensor:
    """1 - 2 * angle / pi: the expected ``1 - 2 * hamming / B`` of random-hyperplane (SimHash) codes."""
    return 1.0 - 2.0 * torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class HashHead(nn.Module):
    """Item (or projected query) embeddings (N, D) -> B-bit codes: sign of a Linear/MLP output."""

    def __init__(self, *, dim: int, config: HashConfig | None = None):
        super().__init__()
        self.config = config or HashConfig()
        self.dim = int(dim)
        torch.manual_seed(self.config.seed)
        b, h = self.config.bits, self.config.hidden
        self.net = nn.Linear(dim, b) if h == 0 else nn.Sequential(nn.Linear(dim, h), nn.GELU(), nn.Linear(h, b))
        if h == 0:  # start from random hyperplanes (SimHash); training adapts them to the data
            nn.init.normal_(self.net.weight, std=1.0)
            nn.init.zeros_(self.net.bias)
        self.history: list[dict] = []
        self.device = resolve_device(self.config.device, error=HashingError)
        self.to(self.device)

    @property
    def bits(self) -> int:
        return self.config.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, B) relaxed codes in (-1, 1)
        return torch.tanh(self.net(x))

    def fit(self, embeddings: np.ndarray, *, extra: np.ndarray | None = None, progress: bool = False) -> list[dict]:
        """Train on item embeddings (plus ``extra`` vectors, e.g. projected queries) so that code
        inner products match the angular similarities of the float vectors."""
        x = l2_normalise(check_embeddings(embeddings, self.dim))
        if extra is not None and len(extra):
            x = np.concatenate([x, l2_normalise(check_embeddings(extra, self.dim, "extra vectors"))])
        if len(x) < 2:
            raise HashingError("HashHead.fit needs at least 2 embeddings")
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        xt = torch.from_numpy(x).to(self.device)
        opt = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
        steps = range(cfg.steps)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="hash head", mininterval=2.0)
        n = min(cfg.batch_size, len(x))
        self.train()
        logs = []
        for step in steps:
            b = xt[torch.randperm(len(x), generator=g)[:n].to(self.device)]  # (n, D)
            loss, parts = hash_loss(self(b), b @ b.T, quant_weight=cfg.quant_weight,
                                    balance_weight=cfg.balance_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            logs.append({"loss": loss.item(), **parts})
            if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
                self.history.append({"step": step + 1, **{k: float(np.mean([l[k] for l in logs])) for k in logs[0]}})
                logs = []
        self.eval()
        return self.history

    @torch.no_grad()
    def codes(self, embeddings: np.ndarray, *, batch_size: int = 8192) -> np.ndarray:
        """Embeddings (N, D) -> bool bits (N, B)."""
        x = check_embeddings(embeddings, self.dim)
        self.eval()
        out = [(self.net(torch.from_numpy(x[i:i + batch_size]).to(self.device)) > 0).cpu().numpy()
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.bits), dtype=bool)

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) -> packed codes uint8 (N, B/8) (numpy packbits, big-endian bits)."""
        return np.packbits(self.codes(embeddings), axis=1)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in self.state_dict().items()}, path / "hash_head.pt")
        (path / "hash_head.json").write_text(json.dumps(
            {"format_version": FORMAT_VERSION, "dim": self.dim, "config": to_dict(self.config),
             "history": self.history}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "HashHead":
        path = Path(path)
        try:
            meta = json.loads((path / "hash_head.json").read_text())
            head = cls(dim=meta["dim"], config=from_dict(HashConfig, meta["config"]))
            head.load_state_dict(torch.load(path / "hash_head.pt", map_location=head.device, weights_only=True))
        except FileNotFoundError as exc:
            raise HashingError(f"no hash head at {path}: {exc.filename} missing") from None
        except (json.JSONDecodeError, KeyError, ConfigError, RuntimeError, EOFError) as exc:
            raise HashingError(f"corrupt hash head at {path}: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise HashingError(f"hash head at {path} has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        head.history = meta.get("history", [])
        head.eval()
        return head


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between packed codes a (N, W) and b (M, W) -> int (N, M)."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x, axis=2).sum(axis=2)


# ---------------------------------------------------------------------------------- binary index
@dataclass
class BinaryIndexConfig:
    kind: str = "hnsw"         # "flat" (exact Hamming; small sets) | "hnsw" | "ivf"
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 256
    ivf_nlist: int = 64        # IVF cells; trained on the codes of the first add
    ivf_nprobe: int = 8
    candidates: int = 200      # Hamming candidates per query re-ranked with float cosine
    rebuild_ratio: float = 0.2  # HNSW cannot delete: rebuild once tombstones exceed this share

    def __post_init__(self):
        if self.kind not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"kind must be 'flat', 'hnsw' or 'ivf', got {self.kind!r}")
        if min(self.hnsw_m, self.ef_search, self.ivf_nlist, self.ivf_nprobe, self.candidates) < 1:
            raise ValueError("hnsw_m, ef_search, ivf_nlist, ivf_nprobe and candidates must be >= 1")


class BinaryIndex:
    """Packed codes in a faiss binary index (by int64 id) + float embeddings for exact re-ranking."""

    def __init__(self, *, bits: int, dim: int, config: BinaryIndexConfig | None = None):
        if bits % 8:
            raise HashingError(f"bits must be a multiple of 8, got {bits}")
        self.bits, self.dim = int(bits), int(dim)
        self.config = config or BinaryIndexConfig()
        self.index = None                      # faiss.IndexBinaryIDMap2, built on first add
        self.codes: dict[int, np.ndarray] = {}  # id -> packed code (kept to rebuild HNSW)
        self.vectors: dict[int, np.ndarray] = {}  # id -> unit float embedding
        self.tombstones: set[int] = set()       # ids deleted but still inside an HNSW graph

    def __len__(self) -> int:
        return len(self.vectors)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self.vectors

    @property
    def ids(self) -> np.ndarray:
        return np.fromiter(self.vectors.keys(), dtype=np.int64, count=len(self.vectors))

    def _new_index(self, train_codes: np.ndarray):
        cfg = self.config
        if cfg.kind == "flat":
            inner = faiss.IndexBinaryFlat(self.bits)
        elif cfg.kind == "hnsw":
            inner = faiss.IndexBinaryHNSW(self.bits, cfg.hnsw_m)
            inner.hnsw.efConstruction = cfg.ef_construction
            inner.hnsw.efSearch = cfg.ef_search
        else:
            nlist = min(cfg.ivf_nlist, max(1, len(train_codes) // 39))
            inner = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(self.bits), self.bits, nlist)
            inner.train(train_codes)
            inner.nprobe = min(cfg.ivf_nprobe, nlist)
        self._inner = inner
        if cfg.kind == "ivf":  # IVF stores user ids itself (IDMap2 would renumber them after a removal)
            return inner
        return faiss.IndexBinaryIDMap2(inner)  # Python owns `inner`; self._inner keeps it alive

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise HashingError(f"ids must be a 1-D integer array, got dtype {ids.dtype} shape {ids.shape}")
        return ids.astype(np.int64)

    def add(self, ids, codes: np.ndarray, embeddings: np.ndarray) -> None:
        """Add items: int64 ids (N,), packed codes uint8 (N, B/8), float embeddings (N, D)."""
        ids = self._check_ids(ids)
        codes = np.ascontiguousarray(codes)
        if codes.dtype != np.uint8 or codes.shape != (len(ids), self.bits // 8):
            raise HashingError(f"codes must be uint8 of shape ({len(ids)}, {self.bits // 8}), "
                               f"got {codes.dtype} {codes.shape}")
        emb = l2_normalise(check_embeddings(embeddings, self.dim))
        if len(emb) != len(ids):
            raise HashingError(f"{len(ids)} ids but {len(emb)} embeddings")
        if len(set(ids.tolist())) != len(ids):
            raise HashingError("duplicate ids within one add()")
        dup = [i for i in ids.tolist() if i in self.vectors]
        if dup:
            raise HashingError(f"ids already in the index: {dup[:5]}")
        if len(ids) == 0:
            return
        revived = [i for i in ids.tolist() if i in self.tombstones]
        if self.index is None:
            self.index = self._new_index(codes)
        if revived:  # an HNSW tombstone id comes back: rebuild without the stale entries first
            self.tombstones.difference_update(revived)
            self._rebuild()
        self.index.add_with_ids(codes, ids)
        for i, c, v in zip(ids.tolist(), codes, emb):
            self.codes[i] = c
            self.vectors[i] = v

    def remove(self, ids) -> None:
        """Remove items by id; unknown ids are an error. Removed ids never come back from search."""
        ids = self._check_ids(ids)
        if len(set(ids.tolist())) != len(ids):
            raise HashingError("duplicate ids within one remove()")
        unknown = [i for i in ids.tolist() if i not in self.vectors]
        if unknown:
            raise HashingError(f"cannot remove unknown ids: {unknown[:5]}")
        for i in ids.tolist():
            del self.vectors[i]
            del self.codes[i]
        if self.config.kind == "hnsw":
            self.tombstones.update(ids.tolist())
            if len(self.tombstones) > self.config.rebuild_ratio * max(1, self.index.ntotal):
                self._rebuild()
        elif len(ids):
            self.index.remove_ids(ids)

    def _rebuild(self) -> None:
        """Rebuild the faiss index from the live codes (drops HNSW tombstones)."""
        ids = self.ids
        codes = np.stack([self.codes[i] for i in ids.tolist()]) if len(ids) else np.zeros((0, self.bits // 8), np.uint8)
        self.index = self._new_index(codes if len(codes) else np.zeros((1, self.bits // 8), np.uint8))
        if len(ids):
            self.index.add_with_ids(codes, ids)
        self.tombstones.clear()

    def search(self, query_codes: np.ndarray, query_vectors: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Hamming candidates re-ranked by cosine -> (ids int64 (Q, k), scores float32 (Q, k)); -1 pads."""
        if k < 1:
            raise HashingError(f"k must be >= 1, got {k}")
        qv = l2_normalise(check_embeddings(query_vectors, self.dim, "query vectors"))
        query_codes = np.ascontiguousarray(query_codes)
        if query_codes.dtype != np.uint8 or query_codes.shape != (len(qv), self.bits // 8):
            raise HashingError(f"query codes must be uint8 of shape ({len(qv)}, {self.bits // 8}), "
                               f"got {query_codes.dtype} {query_codes.shape}")
        out_ids = np.full((len(qv), k), -1, dtype=np.int64)
        out_scores = np.full((len(qv), k), -np.inf, dtype=np.float32)
        if len(self) == 0 or len(qv) == 0:
            return out_ids, out_scores
        n_cand = min(max(self.config.candidates, k) + len(self.tombstones), self.index.ntotal)
        _, cand = self.index.search(query_codes, n_cand)                 # (Q, n_cand), -1 pads
        for q in range(len(qv)):
            ids = [i for i in cand[q].tolist() if i >= 0 and i in self.vectors]
            if not ids:
                continue
            sims = np.stack([self.vectors[i] for i in ids]) @ qv[q]      # (n,)
            order = np.argsort(-sims, kind="stable")[:k]
            out_ids[q, :len(order)] = np.asarray(ids)[order]
            out_scores[q, :len(order)] = sims[order]
        return out_ids, out_scores

    def nbytes_per_item(self) -> dict:
        """Bytes per item: the packed code, and the float vector kept for re-ranking."""
        return {"code": self.bits // 8, "float": 4 * self.dim}

    def save(self, path: str | Path) -> None:
        """Folder: binary.index (faiss.write_index_binary), vectors.npy + ids.npy, meta.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.tombstones:
            self._rebuild()
        ids = self.ids
        np.save(path / "ids.npy", ids)
        np.save(path / "vectors.npy", np.stack([self.vectors[i] for i in ids.tolist()]) if len(ids)
                else np.zeros((0, self.dim), np.float32))
        np.save(path / "codes.npy", np.stack([self.codes[i] for i in ids.tolist()]) if len(ids)
                else np.zeros((0, self.bits // 8), np.uint8))
        if self.index is not None:
            faiss.write_index_binary(self.index, str(path / "binary.index"))
        (path / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "bits": self.bits,
                                                    "dim": self.dim, "config": to_dict(self.config),
                                                    "has_index": self.index is not None}))

    @classmethod
    def load(cls, path: str | Path) -> "BinaryIndex":
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            out = cls(bits=meta["bits"], dim=meta["dim"], config=from_dict(BinaryIndexConfig, meta["config"]))
            ids = np.load(path / "ids.npy")
            vectors = np.load(path / "vectors.npy")
            codes = np.load(path / "codes.npy")
        except FileNotFoundError as exc:
            raise HashingError(f"no binary index at {path}: {exc.filename} missing") from None
        except (json.JSONDecodeError, KeyError, ConfigError, ValueError) as exc:
            raise HashingError(f"corrupt binary index at {path}: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise HashingError(f"binary index at {path} has format {meta.get('format_version')}")
        if not (len(ids) == len(vectors) == len(codes)) or vectors.shape[1:] != (out.dim,) \
                or codes.shape[1:] != (out.bits // 8,):
            raise HashingError(f"corrupt binary index at {path}: ids/vectors/codes shapes disagree")
        out.vectors = dict(zip(ids.tolist(), vectors.astype(np.float32)))
        out.codes = dict(zip(ids.tolist(), codes.astype(np.uint8)))
        if meta["has_index"]:
            try:
                out.index = faiss.read_index_binary(str(path / "binary.index"))
            except RuntimeError as exc:
                raise HashingError(f"cannot read faiss binary index at {path}: {exc}") from None
            if out.index.ntotal != len(ids):
                raise HashingError(f"faiss index at {path} holds {out.index.ntotal} codes, store has {len(ids)}")
            inner = faiss.downcast_IndexBinary(out.index.index if out.config.kind != "ivf" else out.index)
            if out.config.kind == "hnsw":
                inner.hnsw.efSearch = out.config.ef_search
            elif out.config.kind == "ivf":
                inner.nprobe = min(out.config.ivf_nprobe, inner.nlist)
            out._inner = inner
        return out
