"""A synthetic retrieval task: attribute items, templated queries, held-out paraphrase templates.

Each item is a distinct (colour, object, place) combination; its embedding is the normalised sum
of one random vector per attribute value (plus noise), so semantic identifiers fitted on the
embeddings reflect the attributes. Training queries use one set of templates, validation
queries a disjoint set (held-out paraphrases). Used by the end-to-end learning test and by
``benchmarks/train_ddp_check.py``; ``train_synthetic`` runs the whole chain
(identifiers -> query tokenizer -> AceModel -> train_retriever -> constrained-search eval).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
OBJECTS = ["car", "dog", "cat", "boat", "chair", "bicycle", "guitar", "kite", "horse", "umbrella"]
PLACES = ["beach", "forest", "kitchen", "street", "garden", "desert", "office", "harbour"]

TRAIN_TEMPLATES = [
    "a photo of a {colour} {object} in the {place}",
    "{colour} {object} at the {place}",
    "a {object} that is {colour} near a {place}",
    "picture of the {place} with one {colour} {object}",
]
HELDOUT_TEMPLATES = [
    "show me a {colour} {object} , {place}",
    "the {place} : {colour} {object}",
    "{object} , {colour} , {place}",
]


@dataclass
class SyntheticTask:
    """Items (ids, attributes, embeddings) and (query, item_id) pairs for training and held-out eval."""

    item_ids: list[str]
    attributes: list[tuple[str, str, str]]
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]]


def make_synthetic_task(n_items: int = 240, *, dim: int = 64, noise: float = 0.05, seed: int = 0) -> SyntheticTask:
    """``n_items`` distinct attribute combinations with train / held-out paraphrase queries."""
    combos = list(itertools.product(COLOURS, OBJECTS, PLACES))
    if not 1 <= n_items <= len(combos):
        raise ValueError(f"n_items must be in [1, {len(combos)}], got {n_items}")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(combos), size=n_items, replace=False)
    attributes = [combos[i] for i in sorted(pick)]
    vectors = {w: rng.standard_normal(dim).astype(np.float32) for w in COLOURS + OBJECTS + PLACES}
    emb = np.stack([vectors[c] + vectors[o] + vectors[p] for c, o, p in attributes])  # (N, D)
    emb += noise * rng.standard_normal(emb.shape).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    item_ids = [f"syn{i:04d}" for i in range(n_items)]

    def queries(templates):
        return [(t.format(colour=c, object=o, place=p), item_id)
                for item_id, (c, o, p) in zip(item_ids, attributes) for t in templates]

    return SyntheticTask(item_ids=item_ids, attributes=attributes, embeddings=emb.astype(np.float32),
                         train_pairs=queries(TRAIN_TEMPLATES), val_pairs=queries(HELDOUT_TEMPLATES))


def random_codes(n: int, level_sizes, rng: np.random.Generator) -> np.ndarray:
    """n distinct random identifiers int64 (n, L), code j of level d in [0, level_sizes[d])."""
    capacity = float(np.prod([float(s) for s in level_sizes]))
    if n > capacity:
        raise ValueError(f"cannot draw {n} distinct identifiers from level_sizes {list(level_sizes)} "
                         f"({int(capacity)} possible)")
    out = np.zeros((0, len(level_sizes)), np.int64)
    while out.shape[0] < n:
        extra = np.stack([rng.integers(0, s, 2 * (n - out.shape[0]) + 16) for s in level_sizes], 1)
        out = np.unique(np.concatenate([out, extra]), axis=0)
    return out[rng.permutation(out.shape[0])[:n]]


def mixture_embeddings(n: int, dim: int, *, seed: int = 0, components: int = 2000, out=None,
                       chunk: int = 65_536) -> np.ndarray:
    """Gaussian-mixture embeddings (``components`` random means, per-component spread 0.3-0.8),
    L2-normalised float32 (n, dim); written chunkwise into ``out`` (e.g. a memmap) when given."""
    if n < 1 or dim < 1:
        raise ValueError(f"need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(components, dim)).astype(np.float32)       # (C, D)
    spread = rng.uniform(0.3, 0.8, size=components).astype(np.float32)
    out = np.empty((n, dim), np.float32) if out is None else out
    for s in range(0, n, chunk):
        b = min(chunk, n - s)
        comp = rng.integers(0, components, b)
        x = means[comp] + spread[comp, None] * rng.normal(size=(b, dim)).astype(np.float32)
        out[s:s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def mixture_embeddings_file(folder: str | Path, n: int, dim: int, *, seed: int = 0, components: int = 2000) -> Path:
    """``mixture_embeddings`` as ``folder/synthetic_{n}x{dim}_s{seed}.npy`` (made once, then reused;
    open it with ``np.load(path, mmap_mode="r")``)."""
    path = Path(folder) / f"synthetic_{n}x{dim}_s{seed}.npy"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    mixture_embeddings(n, dim, seed=seed, components=components, out=mm)
    mm.flush()
    del mm
    tmp.rename(path)
    return path


def synthetic_identifier_config():
    """A small identifier shape for a few hundred items: K=16, one RQ level of 16 codes, U=32."""
    from identifiers.config import IdentifierConfig

    return IdentifierConfig(K=16, M=1, codebook_size=16, max_u=32, kmeans_n_init=1, kmeans_max_iter=50,
                            hidden_dims=(64,), latent_dim=16, rqvae_max_steps=300, rqvae_batch_size=256,
                            codebook_kmeans_iters=10, seed=0)


def synthetic_model_config(query_vocab_size: int, level_sizes, **overrides):
    """A tiny AceModel config (d 64, 2+2 layers) that learns the task in well under a CPU-minute."""
    from ace.model.config import AceConfig

    kw = dict(d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, ffn_dim=128, dropout=0.1,
              query_vocab_size=query_vocab_size, max_query_length=24, level_sizes=list(level_sizes))
    kw.update(overrides)
    return AceConfig(**kw)


def fit_synthetic_artefacts(task: SyntheticTask):
    """Identifiers (SemanticIdTokenizer) and a SentencePiece query tokenizer for the task."""
    from ace.model.tokens import QueryTokenizer
    from identifiers.semantic_ids import SemanticIdTokenizer

    id_tok = SemanticIdTokenizer.fit(task.embeddings, task.item_ids, synthetic_identifier_config(), progress=False)
    qtok = QueryTokenizer.train([q for q, _ in task.train_pairs], vocab_size=200, max_length=24)
    return id_tok, qtok


def train_synthetic(task: SyntheticTask, run_dir: str | Path, cfg, *, id_tokenizer=None, query_tokenizer=None,
                    accelerator=None, model_overrides=None, resume: bool = False):
    """(Identifiers, query tokenizer) -> AceModel -> train_retriever; returns (TrainResult, parts dict).

    Under several processes pass ``id_tokenizer`` and ``query_tokenizer`` fitted beforehand (as the
    pipeline's identifier stage does): every process must train on the same identifiers, and
    fitting the RQ-VAE inside a distributed job would run vector-quantize-pytorch's codebook sync
    collectives.
    """
    import torch

    from ace.model.modeling import AceModel
    from ace.model.tokens import IdentifierVocab
    from ace.training.loop import make_accelerator, train_retriever

    accelerator = accelerator or make_accelerator(cfg)
    if id_tokenizer is None or query_tokenizer is None:
        if accelerator.num_processes > 1:
            raise ValueError("train_synthetic under several processes needs id_tokenizer and query_tokenizer "
                             "fitted beforehand (see fit_synthetic_artefacts)")
        id_tokenizer, query_tokenizer = fit_synthetic_artefacts(task)
    vocab = IdentifierVocab(id_tokenizer.level_sizes)
    torch.manual_seed(cfg.seed)
    model = AceModel(synthetic_model_config(query_tokenizer.vocab_size, id_tokenizer.level_sizes,
                                            **(model_overrides or {})))
    result = train_retriever(model, query_tokenizer, id_tokenizer, vocab, task.train_pairs, task.val_pairs, cfg,
                             run_dir, resume=resume, accelerator=accelerator)
    return result, {"model": model, "query_tokenizer": query_tokenizer, "id_tokenizer": id_tokenizer, "vocab": vocab}
