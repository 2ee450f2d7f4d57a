"""SemanticIdTokenizer: item embeddings -> unique identifiers (k, v1..vM, u) and their prefix trie.

    tok = SemanticIdTokenizer.fit(embeddings, item_ids, IdentifierConfig())
    tok.codes            # (N, M+2) int64, row i <-> tok.item_ids[i]
    tok.trie.flat()      # FlatTrie for constrained decoding
    tok.assign(new_embeddings, new_ids)   # new items; existing identifiers never change
    tok.save("run/identifiers"); SemanticIdTokenizer.load("run/identifiers")

k = nearest MiniBatch K-Means centroid of the L2-normalised embedding, v1..vM = RQ-VAE codes of
the residual x - centroid[k], u = ID-table counter of the (k, v1..vM) prefix.
Ablations (IdentifierConfig): ``quantizer=kmeans`` gives v1..vM by hierarchical K-Means instead of
the RQ-VAE; ``use_kmeans=False`` makes k one constant code (see ``IdentifierConfig.num_clusters``).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ace.arrays import resolve_device
from ace.config import ConfigError, load_config, save_config
from .config import IdentifierConfig
from .hierarchical_kmeans import HierarchicalKMeans
from .id_table import IdTable, IdTableError
from .inputs import IdentifierInputError, check_embeddings, check_item_ids, l2_normalise
from .kmeans import KMeansClusterer, sample_rows
from .rqvae import RQVAE, auto_threads, fit_rqvae, thread_limit
from .trie import IdentifierTrie, TrieError

FORMAT_NAME = "ace-semantic-ids"
FORMAT_VERSION = 1
_FILES = ("config.yaml", "centroids.npy", "id_table.npz", "stats.json",
          "trie/codes.npy", "trie/item_ids.marisa", "trie/item_id_rows.npy", "trie/flat_trie.npz")
QUANTIZER_FILES = {"rqvae": "rqvae.safetensors", "kmeans": "hkmeans.npz"}


def _files(quantizer: str) -> tuple[str, ...]:
    return _FILES + (QUANTIZER_FILES[quantizer],)


class TokenizerFormatError(ValueError):
    """A saved tokenizer folder is missing, of another format version, or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class SemanticIdTokenizer:
    """K-Means centroids + RQ-VAE (or hierarchical K-Means) + ID table + identifier trie, fitted together."""

    def __init__(self, *, config: IdentifierConfig, centroids: np.ndarray, rqvae: RQVAE | None = None,
                 hkmeans: HierarchicalKMeans | None = None, table: IdTable, trie: IdentifierTrie,
                 stats: dict | None = None, device: str | None = None):
        if (rqvae is None) == (hkmeans is None) or (hkmeans is not None) != (config.quantizer == "kmeans"):
            raise ValueError(f"quantizer={config.quantizer!r} needs exactly its own model "
                             f"(rqvae for 'rqvae', hkmeans for 'kmeans')")
        self.config = config
        self.device = resolve_device(device)
        self.kmeans = KMeansClusterer(K=config.num_clusters, chunk=config.encode_batch_size, seed=config.seed)
        self.kmeans.centroids = np.asarray(centroids, dtype=np.float32)
        self.rqvae = rqvae.to(self.device).eval() if rqvae is not None else None
        self.hkmeans = hkmeans
        self.table = table
        self.trie = trie
        self.stats = dict(stats or {})

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, embeddings, item_ids, config: IdentifierConfig | None = None, *,
            device: str | None = None, progress: bool = True) -> "SemanticIdTokenizer":
        """Fit K-Means and the RQ-VAE on (a sample of) ``embeddings`` and give every item an identifier."""
        config = config or IdentifierConfig()
        with thread_limit(config.num_threads):              # 0: per-stage choice below
            return cls._fit(embeddings, item_ids, config, device=device, progress=progress)

    @classmethod
    def _fit(cls, embeddings, item_ids, config, *, device, progress) -> "SemanticIdTokenizer":
        device = resolve_device(device)
        t_start = time.time()
        x = check_embeddings(embeddings, chunk=config.encode_batch_size)
        N, D = x.shape
        ids = check_item_ids(item_ids, N)
        K = config.num_clusters
        if N < K:
            raise IdentifierInputError(f"need at least K={K} items to fit {K} clusters, "
                                       f"got N={N}; lower K (e.g. K={max(1, N // 4)})")
        times = {}
        t = time.time()
        sample = sample_rows(N, config.fit_sample, config.seed)
        xs = l2_normalise(x[sample])                                   # (n, D)
        kmeans = KMeansClusterer(K=K, batch_size=config.kmeans_batch_size,
                                 max_iter=config.kmeans_max_iter, n_init=config.kmeans_n_init,
                                 seed=config.seed, chunk=config.encode_batch_size)
        if config.use_kmeans:
            with thread_limit(config.num_threads or auto_threads(min(config.kmeans_batch_size, N) * D * K)):
                kmeans.fit(xs)
        else:                                                          # K-Means with K = 1: the mean
            kmeans.centroids = xs.mean(0, keepdims=True).astype(np.float32)   # (1, D)
        times["kmeans_fit_s"] = time.time() - t

        t = time.time()
        ks = kmeans.predict(xs, normalise=False)
        residuals = xs - kmeans.centroids[ks]                          # (n, D)
        del xs
        rqvae = hkmeans = None
        if config.quantizer == "kmeans":
            hkmeans = HierarchicalKMeans(M=config.M, codebook_size=config.codebook_size,
                                         max_iter=config.kmeans_max_iter, n_init=config.kmeans_n_init,
                                         seed=config.seed)
            with thread_limit(config.num_threads or 1):
                hkmeans.fit(residuals, ks, progress=progress)
            history = {"steps": 0, "loss": []}
            times["hkmeans_fit_s"] = time.time() - t
            err = ((hkmeans.reconstruct(residuals, ks) - residuals) ** 2).sum()
            recon = {"relative": float(err / max((residuals ** 2).sum(), 1e-30)), "mse": float(err / residuals.size)}
        else:
            rqvae, history = fit_rqvae(residuals, config, device=device, progress=progress)
            times["rqvae_fit_s"] = time.time() - t
            recon = cls._recon_error(rqvae, residuals, config.encode_batch_size, device)
        del residuals

        table = IdTable(prefix_sizes=config.level_sizes[:-1], max_u=config.max_u)
        tok = cls(config=config, centroids=kmeans.centroids, rqvae=rqvae, hkmeans=hkmeans, table=table,
                  trie=IdentifierTrie(level_sizes=config.level_sizes), device=device)
        t = time.time()
        prefixes = tok.encode_prefixes(x, progress=progress)           # (N, M+1)
        times["encode_s"] = time.time() - t
        t = time.time()
        u = table.assign(prefixes)                                      # (N,)
        codes = np.concatenate([prefixes, u[:, None]], axis=1)          # (N, L)
        tok.trie.add(codes, ids)
        times["table_trie_s"] = time.time() - t
        times["total_s"] = time.time() - t_start
        tok.stats = {"fit_rows": int(sample.size), "input_dim": int(D), "recon_error": recon,
                     "rqvae_steps": history["steps"],
                     "rqvae_final_loss": history["loss"][-1] if history["loss"] else None,
                     "times": times}
        return tok

    @staticmethod
    @torch.no_grad()
    def _recon_error(rqvae: RQVAE, residuals: np.ndarray, chunk: int, device: str) -> dict:
        """Relative (sum ||r - r_hat||^2 / sum ||r||^2) and per-dimension MSE on the fit sample."""
        err = tot = 0.0
        for s in range(0, residuals.shape[0], chunk):
            r = torch.from_numpy(np.ascontiguousarray(residuals[s:s + chunk])).to(device)
            err += float(((rqvae.reconstruct(r) - r) ** 2).sum())
            tot += float((r ** 2).sum())
        n = residuals.shape[0] * residuals.shape[1]
        return {"relative": err / max(tot, 1e-30), "mse": err / n}

    # ---- encoding ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prefixes(self, x, *, progress: bool = False) -> np.ndarray:
        """(N, D) embeddings -> (N, M+1) int64 prefixes (k, v1..vM), in chunks."""
        c = self.kmeans.centroids                                      # (K, D)
        half_sq = 0.5 * (c * c).sum(1)
        chunk = self.config.encode_batch_size
        out = np.empty((x.shape[0], self.config.M + 1), dtype=np.int64)
        for s in tqdm(range(0, x.shape[0], chunk), desc="encode", disable=not progress, leave=False):
            xn = l2_normalise(x[s:s + chunk])                          # (B, D)
            k = np.argmax(xn @ c.T - half_sq, axis=1)                  # (B,)
            out[s:s + xn.shape[0], 0] = k
            out[s:s + xn.shape[0], 1:] = self._quantize(xn - c[k], k)  # (B, M)
        return out

    def _quantize(self, r: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Residuals (B, D) of clusters k (B,) -> (B, M) codes v1..vM."""
        if self.hkmeans is not None:
            return self.hkmeans.encode(r, k)
        return self.rqvae.encode(torch.from_numpy(np.ascontiguousarray(r)).to(self.device)).cpu().numpy()

    def assign(self, embeddings, item_ids, *, progress: bool = False) -> np.ndarray:
        """Identifiers for new items (nearest centroid + RQ-VAE + next free u); old rows unchanged."""
        x = check_embeddings(embeddings, dim=self.dim, chunk=self.config.encode_batch_size)
        ids = check_item_ids(item_ids, x.shape[0])
        taken = [i for i in ids if i in self.trie]
        if taken:
            raise IdentifierInputError(f"item id(s) already have identifiers: {taken[:10]}"
                                       + (f" ... ({len(taken)} in all)" if len(taken) > 10 else ""))
        with thread_limit(self.config.num_threads):
            prefixes = self.encode_prefixes(x, progress=progress)
        u = self.table.assign(prefixes)
        codes = np.concatenate([prefixes, u[:, None]], axis=1)           # (n, L)
        self.trie.add(codes, ids)
        return codes

    def restore(self, codes, item_ids) -> None:
        """Re-insert identifiers assigned earlier (e.g. read back from the item store) unchanged;
        their u values stay taken, so later ``assign`` calls never reuse them."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.length:
            raise IdentifierInputError(f"identifiers to restore must have shape (n, {self.length}), got {codes.shape}")
        self.trie.add(codes, list(item_ids))
        self.table.reserve(codes[:, :-1], codes[:, -1])

    def remove(self, item_ids) -> None:
        """Drop items; their identifiers never decode again (u counters are not reused)."""
        self.trie.remove(item_ids)

    # ---- views ---------------------------------------------------------------------------
    @property
    def codes(self) -> np.ndarray:
        return self.trie.codes

    @property
    def item_ids(self) -> list[str]:
        return self.trie.item_ids

    @property
    def level_sizes(self) -> list[int]:
        return self.config.level_sizes

    @property
    def length(self) -> int:
        return self.config.length

    @property
    def dim(self) -> int:
        return int(self.kmeans.centroids.shape[1])

    @property
    def centroids(self) -> np.ndarray:
        return self.kmeans.centroids

    @property
    def codebooks(self) -> list[np.ndarray]:
        """M arrays (C, latent) (RQ-VAE) or (C, D) (hierarchical K-Means: mean step per code)."""
        return self.hkmeans.codebooks if self.hkmeans is not None else self.rqvae.codebooks

    @property
    def level_vectors(self) -> list[np.ndarray | None]:
        """One array per identifier level for AceModel.init_identifier_embeddings: the K-Means centroids
        (None without the K-Means token), each codebook, None for the counter u."""
        return [self.centroids if self.config.use_kmeans else None, *self.codebooks, None]

    def __len__(self) -> int:
        return len(self.trie)

    def codes_of(self, item_ids) -> np.ndarray:
        rows = []
        for item in item_ids:
            r = self.trie.row_of(item)
            if r < 0:
                raise IdentifierInputError(f"unknown item id {item!r}")
            rows.append(r)
        return self.codes[np.asarray(rows, dtype=np.int64)]

    def lookup(self, codes) -> str | None:
        return self.trie.lookup(codes)

    def summary(self) -> dict:
        """N, collision rate (share with u > 0), max u, per-level code usage, recon error, times."""
        codes = self.codes
        N = int(codes.shape[0])
        usage = []
        for level, size in enumerate(self.level_sizes[:-1]):
            used = int(np.unique(codes[:, level]).size) if N else 0
            usage.append({"level": "k" if level == 0 else f"v{level}", "used": used,
                          "size": int(size), "share": used / size})
        return {"N": N,
                "collision_rate": float((codes[:, -1] > 0).mean()) if N else 0.0,
                "max_u": int(codes[:, -1].max()) if N else 0,
                "distinct_prefixes": int(np.unique(codes[:, :-1], axis=0).shape[0]) if N else 0,
                "codebook_usage": usage,
                "recon_error": self.stats.get("recon_error"),
                "times": self.stats.get("times", {})}

    # ---- persistence ---------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the whole tokenizer to ``folder`` with a checksummed format.json manifest."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_config(self.config, folder / "config.yaml")
        np.save(folder / "centroids.npy", self.centroids)
        if self.hkmeans is not None:
            np.savez(folder / "hkmeans.npz", **self.hkmeans.state())
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in self.rqvae.state_dict().items()}
            save_file(state, str(folder / "rqvae.safetensors"))
        np.savez(folder / "id_table.npz", **self.table.state())
        (folder / "stats.json").write_text(json.dumps(self.stats, indent=2))
        self.trie.save(folder / "trie")
        files = _files(self.config.quantizer)
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "input_dim": self.dim,
                    "quantizer": self.config.quantizer, "num_items": len(self),
                    "files": {f: _sha256(folder / f) for f in files}}
        (folder / "format.json").write_text(json.dumps(manifest, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None) -> "SemanticIdTokenizer":
        """Read a folder written by ``save``; other versions and corrupt files raise TokenizerFormatError."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerFormatError(f"tokenizer folder not found: {folder}")
        meta_path = folder / "format.json"
        if not meta_path.is_file():
            raise TokenizerFormatError(f"{folder} is not a saved SemanticIdTokenizer (no format.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerFormatError(f"{meta_path} is corrupt: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise TokenizerFormatError(f"{meta_path} is not an {FORMAT_NAME} manifest")
        if meta.get("version") != FORMAT_VERSION:
            raise TokenizerFormatError(f"{folder} holds tokenizer format version {meta.get('version')}; "
                                       f"this code reads version {FORMAT_VERSION} - rebuild the identifiers")
        files = meta.get("files") or {}
        quantizer = meta.get("quantizer", "rqvae")                    # folders from before the ablations: rqvae
        if quantizer not in QUANTIZER_FILES:
            raise TokenizerFormatError(f"{meta_path} names an unknown quantizer {quantizer!r}")
        for name in _files(quantizer):
            path = folder / name
            if not path.is_file():
                raise TokenizerFormatError(f"{folder} is incomplete: missing {name}")
            if name not in files or _sha256(path) != files[name]:
                raise TokenizerFormatError(f"{path} is corrupt (checksum does not match format.json)")
        try:
            config = load_config(IdentifierConfig, folder / "config.yaml")
            if config.quantizer != quantizer:
                raise TokenizerFormatError(f"{folder}: config.yaml says quantizer {config.quantizer!r}, "
                                           f"format.json {quantizer!r}")
            centroids = np.load(folder / "centroids.npy", allow_pickle=False)
            if centroids.shape != (config.num_clusters, meta["input_dim"]):
                raise TokenizerFormatError(f"centroids.npy has shape {centroids.shape}, expected "
                                           f"({config.num_clusters}, {meta['input_dim']})")
            rqvae = hkmeans = None
            if quantizer == "kmeans":
                with np.load(folder / "hkmeans.npz") as z:
                    hkmeans = HierarchicalKMeans.from_state({k: z[k] for k in z.files}, max_iter=config.kmeans_max_iter,
                                                            n_init=config.kmeans_n_init, seed=config.seed)
                if (hkmeans.M, hkmeans.C) != (config.M, config.codebook_size):
                    raise TokenizerFormatError(f"hkmeans.npz has M={hkmeans.M}, C={hkmeans.C}; config.yaml "
                                               f"M={config.M}, codebook_size={config.codebook_size}")
            else:
                rqvae = RQVAE(input_dim=int(meta["input_dim"]), config=config)
                rqvae.load_state_dict(load_file(str(folder / "rqvae.safetensors")), strict=True)
            with np.load(folder / "id_table.npz") as z:
                table = IdTable.from_state({k: z[k] for k in z.files})
            trie = IdentifierTrie.load(folder / "trie", config.level_sizes)
            stats = json.loads((folder / "stats.json").read_text())
        except TokenizerFormatError:
            raise
        except (ConfigError, TrieError, IdTableError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TokenizerFormatError(f"cannot load tokenizer from {folder}: {type(exc).__name__}: {exc}") from None
        if rqvae is not None:
            rqvae.quantizer.eval()
        return cls(config=config, centroids=centroids, rqvae=rqvae, hkmeans=hkmeans, table=table, trie=trie,
                   stats=stats, device=device)
