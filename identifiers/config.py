"""IdentifierConfig: every knob of the (k, v1..vM, u) identifier builder, defaults = the paper's."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IdentifierConfig:
    """K-Means + RQ-VAE (or hierarchical K-Means) + ID table settings (load with ace.config.load_config)."""

    # identifier shape: (k, v1..vM, u)
    K: int = 128                     # K-Means clusters -> k in [0, K)
    M: int = 2                       # residual quantiser levels -> v1..vM
    codebook_size: int = 128         # codes per level C
    max_u: int = 1024                # U: size of the u vocabulary (items sharing one (k, v) prefix)
    # ablations: quantizer of v1..vM, and whether k is a K-Means cluster at all
    quantizer: str = "rqvae"         # rqvae | kmeans (hierarchical K-Means: identifiers/hierarchical_kmeans.py)
    use_kmeans: bool = True          # False: k is one constant code (K = 1, centroid = mean), see num_clusters
    # K-Means (MiniBatchKMeans on L2-normalised embeddings)
    kmeans_batch_size: int = 4096
    kmeans_max_iter: int = 100
    kmeans_n_init: int = 3
    # RQ-VAE on the residual x - centroid[k]
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 64
    alpha: float = 0.25              # commitment weight: loss = recon + alpha * ||r - sg[e]||^2
    ema_decay: float = 0.99          # codebook EMA (the codebook term ||sg[r] - e||^2)
    dead_code_threshold: float = 1.0  # replace codes whose EMA usage falls below this (0 = off)
    codebook_kmeans_iters: int = 20  # k-means init of each codebook on the first batch
    rqvae_epochs: int = 200
    rqvae_max_steps: int = 1500      # bound on optimiser steps whatever the epochs say
    rqvae_lr: float = 1e-3
    rqvae_batch_size: int = 1024
    rqvae_weight_decay: float = 0.0
    # scale
    fit_sample: int = 100_000        # rows (random subsample) used to fit K-Means and the RQ-VAE
    encode_batch_size: int = 65_536  # rows per chunk when normalising / predicting / encoding
    seed: int = 0
    num_threads: int = 0             # >0: cap torch/BLAS/OpenMP threads; 0: auto (1 for small jobs)
    # what is quantised (read by the pipeline, ace/pipeline.py stage_identifiers): the item embedding
    # alone, or the normalised mean of it and its training queries' vectors from ``query_encoder``
    # (a sentence-transformers text encoder that must share the item embedding's space, e.g. MiniLM
    # for the caption proxy whose item embedding is the MiniLM document vector)
    vectors: str = "item"            # item | item_plus_queries
    query_encoder: str = "minilm"    # sentence-transformers id / path / "minilm" (offline all-MiniLM-L6-v2)

    def __post_init__(self):
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        positive = ("K", "M", "codebook_size", "max_u", "kmeans_batch_size", "kmeans_max_iter",
                    "kmeans_n_init", "latent_dim", "rqvae_epochs", "rqvae_max_steps",
                    "rqvae_batch_size", "fit_sample", "encode_batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quantizer not in ("rqvae", "kmeans"):
            raise ValueError(f"quantizer must be 'rqvae' or 'kmeans', got {self.quantizer!r}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive, got {self.hidden_dims}")
        if self.vectors not in ("item", "item_plus_queries"):
            raise ValueError(f"vectors must be 'item' or 'item_plus_queries', got {self.vectors!r}")
        if self.alpha < 0 or not 0 < self.ema_decay < 1 or self.rqvae_lr <= 0:
            raise ValueError("need alpha >= 0, 0 < ema_decay < 1 and rqvae_lr > 0")

    @property
    def length(self) -> int:
        """L = M + 2 levels per identifier."""
        return self.M + 2

    @property
    def num_clusters(self) -> int:
        """Size of the k level: K, or 1 without the K-Means token (use_kmeans=False).

        Without K-Means the level is kept as one constant code rather than removed, so every
        identifier still has L = M + 2 columns (k, v1..vM, u) and the tokenizer, trie, vocabulary
        and decoder contracts hold unchanged; the one centroid is the mean embedding (K-Means with
        K = 1), so v1..vM quantise x - mean. The decoder's first step then has a single choice."""
        return self.K if self.use_kmeans else 1

    @property
    def level_sizes(self) -> list[int]:
        return [self.num_clusters] + [self.codebook_size] * self.M + [self.max_u]
