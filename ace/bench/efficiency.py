"""End-to-end efficiency of ACE vs dual-tower (DT) search: text -> item ids at growing corpus sizes.

    python -m ace.bench efficiency --sizes 1000 10000 100000 1000000 --dims 384 1024 \\
        --ace default --ace minilm=configs/flickr30k_proxy.yaml --out benchmarks/out/efficiency

Both sides start from query text and stop at item rows (the row -> item id lookup is the same list
index for both):
- ACE: query tokenizer -> AceModel -> trie-constrained beam search (``ace.model.decoding``) over the
  identifiers of N items. Weights are random: the search always runs L decoder steps with the
  same shapes, so its cost does not depend on training. Shapes come from ``--ace NAME=SPEC``
  (``default`` = the AceConfig/ModelSection defaults; SPEC = a run config with a ``model:``
  section or a bare model mapping, plus ``key=value`` overrides), each in fp32 and dynamic int8.
- DT: text encoder (all-MiniLM-L6-v2) -> [fixed random projection to D when D != 384, a stand-in
  for a D-dim text tower] -> top-10 by inner product: exact ``torch`` matmul, exact faiss
  ``IndexFlatIP``, and approximate faiss indexes (``ace.bench.ann_baselines``): ``IndexHNSWFlat``,
  IVF-PQ at the hybrid mode's PQ budget and IVF-SQ8, each tuned to ``--ann-target`` recall@10 of
  exact search on held-out near-item query vectors (chosen settings and recalls are reported).

Items are synthetic: a Gaussian mixture (``ace.bench.synthetic.mixture_embeddings``), the first N rows
of one sample per D. ACE identifiers are fitted on the largest-D embeddings of the same N items
(``--identifiers fitted``, the identifier builder's defaults) or drawn at random (``random``).
Every (N, D) group measures all its methods interleaved (the method order rotates each repeat),
so ratios between methods are measured in the same minutes of a possibly busy machine.
Outputs in ``--out``: efficiency.json, efficiency.md, throughput_vs_corpus_size.png and, with
``--trained METHOD=SOURCE`` figures, recall_vs_throughput.png (``ace.bench.efficiency_plots``: only
trained models' recall of the same shape; every other method is drawn as throughput only).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ace.bench.ann_baselines import (ANN_BACKENDS, AnnError, ann_markdown, ann_recall, exact_top_k,  # noqa: F401
                                    faiss_index_bytes, near_item_queries, near_item_sample, own_item_rate,
                                    parse_hnsw_builds, tuned_index)
from ace.bench.efficiency_plots import PlotError, model_arch, parse_trained, plot, read_json, trained_figures
from ace.config import ConfigError, config_hash, deep_merge, from_dict, parse_overrides, read_yaml, to_dict

ROOT = Path(__file__).resolve().parents[2]
TRIE_ARRAYS = ("child_start", "child_count", "child_code", "child_node", "leaf_item")
DT_BACKENDS = ("torch", "faiss_flat") + ANN_BACKENDS
PRECISIONS = ("fp32", "int8")
TOP_K = 10


class EfficiencyError(ValueError):
    """Bad benchmark settings or inputs; the message names the problem."""


@dataclass
class EfficiencyConfig:
    """Settings of one efficiency run (all recorded in efficiency.json)."""
    sizes: list[int] = field(default_factory=lambda: [1000, 10_000, 100_000, 1_000_000])
    dims: list[int] = field(default_factory=lambda: [384, 1024])
    ace: list[str] = field(default_factory=lambda: ["default", "minilm=configs/flickr30k_proxy.yaml"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    dt_backends: list[str] = field(default_factory=lambda: list(DT_BACKENDS))
    devices: list[str] = field(default_factory=lambda: ["auto"])   # auto = cpu, plus cuda when present
    beams: int = 5
    batch: int = 100                 # concurrent queries per throughput call
    num_batches: int = 3             # batches per throughput pass
    repeats: int = 3                 # passes per method (method order rotated each repeat)
    latency_queries: int = 20        # batch-1 queries per method and repeat
    threads: int = 2                 # intra-op threads while measuring search
    build_threads: int = 0           # threads for HNSW builds (0 = threads)
    ann_target: float = 0.95         # recall@10 vs exact the ANN indexes are tuned to (ace.bench.ann_baselines)
    hnsw_builds: list[str] = field(default_factory=lambda: ["32:40", "32:100"])   # M:efConstruction, tried in order
    ivf_nlist_factor: float = 4.0    # IVF lists = factor x sqrt(N)
    pq_bytes: int = 48               # IVF-PQ bytes per item (the hybrid mode's PQ budget)
    tune_queries: int = 200          # held-out near-item query vectors for tuning
    hnsw_max_n: int = 0              # 0 = build ANN indexes at every size; else skip sizes above this
    identifiers: str = "fitted"      # fitted | random
    id_overrides: list[str] = field(default_factory=list)   # IdentifierConfig key=value
    queries: str | None = None       # .txt (one a line) or a caption file; default: templated queries
    text_encoder: str = "all-MiniLM-L6-v2"
    cache_dir: str | None = None     # embeddings, identifiers and HNSW indexes are kept here
    seed: int = 0
    prepare_only: bool = False       # build the cached identifiers and tuned ANN indexes, measure nothing
    trained: list[str] = field(default_factory=list)   # METHOD=RUN_DIR | quality.json#NAME (efficiency_plots)
    hybrid_beams: int = 0            # > 0: each ACE searcher also as the hybrid operating point ("-hybrid" rows):
                                     # its top-B re-ranked by log-prob + w x cosine (0 = no hybrid rows)
    hybrid_storage: str = "float32"  # the hybrid rows' item vectors (bytes per item counted): float32 | int8

    def __post_init__(self):
        if not self.sizes or min(self.sizes) < 1:
            raise EfficiencyError(f"sizes must be positive corpus sizes, got {self.sizes}")
        if not self.dims or min(self.dims) < 1:
            raise EfficiencyError(f"dims must be positive, got {self.dims}")
        for name in ("beams", "batch", "num_batches", "repeats", "latency_queries", "threads", "tune_queries",
                     "pq_bytes"):
            if getattr(self, name) < 1:
                raise EfficiencyError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown or not self.precisions:
            raise EfficiencyError(f"precisions must be among {PRECISIONS}, got {self.precisions}")
        unknown = set(self.dt_backends) - set(DT_BACKENDS)
        if unknown:
            raise EfficiencyError(f"unknown DT backend(s) {sorted(unknown)}; known: {', '.join(DT_BACKENDS)}")
        if not 0 < self.ann_target <= 1 or self.ivf_nlist_factor <= 0:
            raise EfficiencyError(f"ann_target must be in (0, 1] and ivf_nlist_factor > 0, got {self.ann_target} "
                                  f"and {self.ivf_nlist_factor}")
        try:
            parse_hnsw_builds(self.hnsw_builds)
        except AnnError as exc:
            raise EfficiencyError(str(exc)) from None
        if self.hybrid_beams < 0 or self.hybrid_storage not in ("float32", "int8"):
            raise EfficiencyError(f"hybrid_beams must be >= 0 and hybrid_storage float32 or int8, got "
                                  f"{self.hybrid_beams} and {self.hybrid_storage!r}")
        if self.identifiers not in ("fitted", "random"):
            raise EfficiencyError(f"identifiers must be 'fitted' or 'random', got {self.identifiers!r}")
        if self.prepare_only and not self.cache_dir:
            raise EfficiencyError("prepare_only needs cache_dir (the prepared artefacts are kept there)")
        if not self.ace and not self.dt_backends:
            raise EfficiencyError("nothing to measure: no --ace model and no DT backend")
        self.sizes = sorted(set(int(n) for n in self.sizes))


# ------------------------------------------------------------------------------ accounting helpers

def latency_summary(ms) -> dict:
    """Latencies (ms) -> p50 / p99 / mean / count (linear-interpolated percentiles)."""
    x = np.asarray(list(ms), dtype=np.float64)
    if x.size == 0:
        raise EfficiencyError("no latencies to summarise")
    if not np.isfinite(x).all() or (x < 0).any():
        raise EfficiencyError("latencies must be finite and >= 0")
    return {"p50_ms": float(np.percentile(x, 50)), "p99_ms": float(np.percentile(x, 99)),
            "mean_ms": float(x.mean()), "count": int(x.size)}


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Size of the module's serialised state_dict (works for dynamic-int8 packed weights too)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def trie_bytes(trie) -> int:
    """Bytes of the FlatTrie arrays the decoder reads."""
    return int(sum(np.asarray(getattr(trie, name)).nbytes for name in TRIE_ARRAYS))


def bytes_per_item(*, fixed_bytes: int, data_bytes: int, n: int) -> dict:
    """Fixed (model) and per-corpus (index / trie) bytes -> per-item figures."""
    if n < 1:
        raise EfficiencyError(f"corpus size must be >= 1, got {n}")
    return {"fixed_bytes": int(fixed_bytes), "data_bytes": int(data_bytes), "data_per_item": data_bytes / n,
            "total_per_item": (fixed_bytes + data_bytes) / n}


# ------------------------------------------------------------------------------ inputs

def load_queries(path: str | None, *, need: int, seed: int = 0) -> list[str]:
    """Query texts: lines of a .txt file, all captions of a caption file (ace.data.importers), or the
    templated queries of ace.bench.synthetic; repeated in order when fewer than ``need``."""
    if path is None:
        from ace.bench.synthetic import make_synthetic_task
        task = make_synthetic_task(800, seed=seed)
        texts = [q for q, _ in task.train_pairs + task.val_pairs]
    elif not Path(path).is_file():
        raise EfficiencyError(f"query file not found: {path}")
    elif str(path).endswith(".txt"):
        texts = [t.strip() for t in Path(path).read_text().splitlines() if t.strip()]
    else:
        from ace.data.importers import load_proxy_split
        split = load_proxy_split(path)
        texts = split.documents + [q for _, q in split.train_queries + split.test_queries]
    if not texts:
        raise EfficiencyError(f"no query texts in {path}")
    rng = np.random.default_rng(seed)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    return [texts[i % len(texts)] for i in range(max(need, len(texts)))]


def parse_ace_spec(spec: str) -> tuple[str, str | None, list[str]]:
    """``NAME[=YAML][,key=value...]`` or ``NAME=key=value,...`` -> (name, yaml path or None, overrides)."""
    name, _, rest = spec.partition("=")
    name = name.strip()
    if not name:
        raise EfficiencyError(f"ACE model spec {spec!r} has no name (use NAME or NAME=config.yaml[,key=value])")
    if name == "default" and not rest:
        return name, None, []
    path, overrides = None, []
    for part in (p.strip() for p in rest.split(",") if p.strip()):
        if "=" in part:
            overrides.append(part)
        elif path is None:
            path = part
        else:
            raise EfficiencyError(f"ACE model spec {spec!r} names two config files")
    return name, path, overrides


def load_model_section(path: str | None, overrides: list[str]):
    """The run config's ``model:`` section (or a bare model mapping) + overrides -> ModelSection."""
    from ace.model.config import ModelSection

    if path and not Path(path).is_file() and (ROOT / path).is_file():
        path = str(ROOT / path)                                # repo-relative default (configs/...)
    data = read_yaml(path) if path else {}
    if "model" in data:
        data = data["model"]
    if not isinstance(data, dict):
        raise ConfigError(f"the model section of {path} must be a mapping")
    return from_dict(ModelSection, deep_merge(data, parse_overrides(overrides)), prefix="model.")


def identifier_config(overrides: list[str]):
    from ace.config import load_config
    from identifiers import IdentifierConfig
    return load_config(IdentifierConfig, None, overrides)


def item_vectors(n: int, dim: int, *, seed: int, cache_dir: str | None) -> np.ndarray:
    """Float32 (n, dim) mixture embeddings (a memmap of the cached file when cache_dir is set)."""
    from ace.bench.synthetic import mixture_embeddings, mixture_embeddings_file
    if cache_dir is None:
        return mixture_embeddings(n, dim, seed=seed)
    return np.load(mixture_embeddings_file(cache_dir, n, dim, seed=seed), mmap_mode="r")


def corpus_identifiers(vectors: np.ndarray, cfg: EfficiencyConfig, id_config) -> tuple[np.ndarray, float]:
    """Identifier codes (N_max, L) of all items and the seconds it took to make them (cached in cache_dir).

    Fitted once on the largest corpus; the corpus of size n uses the first n rows (a subset of
    distinct identifiers is distinct, and decoding cost depends on the trie's shape, not its size)."""
    from ace.bench.synthetic import random_codes
    n = vectors.shape[0]
    if cfg.identifiers == "random":
        t = time.perf_counter()
        return random_codes(n, id_config.level_sizes, np.random.default_rng(cfg.seed)), time.perf_counter() - t
    cache = None
    if cfg.cache_dir:
        key = config_hash(id_config, n, vectors.shape[1], cfg.seed)
        cache = Path(cfg.cache_dir) / f"identifiers_{n}x{vectors.shape[1]}_{key}.npz"
        if cache.is_file():
            z = np.load(cache)
            return z["codes"], float(z["fit_s"])
    from identifiers import SemanticIdTokenizer
    t = time.perf_counter()
    tok = SemanticIdTokenizer.fit(vectors, [f"s{i}" for i in range(n)], id_config, device="cpu",
                                  progress=n >= 100_000)
    fit_s = time.perf_counter() - t
    codes = np.asarray(tok.codes, dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, codes=codes, fit_s=fit_s)
    return codes, fit_s


def resolve_devices(devices: list[str]) -> list[str]:
    out = []
    for d in devices:
        if d == "auto":
            out += ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        elif d == "cpu" or d.startswith("cuda"):
            if d.startswith("cuda") and not torch.cuda.is_available():
                raise EfficiencyError(f"device {d!r} requested but CUDA is not available")
            out.append(d)
        else:
            raise EfficiencyError(f"unknown device {d!r} (cpu, cuda, cuda:N or auto)")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------ searchers

class AceSearch:
    """Text -> item rows (B, beams) by query tokenizer + constrained beam search over a trie."""

    family = "ACE"

    def __init__(self, *, name: str, model, query_tokenizer, vocab, beams: int, fixed_bytes: int, shape: dict):
        self.name, self.model, self.query_tokenizer, self.vocab = name, model, query_tokenizer, vocab
        self.beams, self.fixed_bytes, self.shape, self.trie = beams, fixed_bytes, shape, None
        self.max_len = model.config.max_query_length
        self.data_bytes = 0                             # per-corpus bytes beyond the trie and the identifiers

    def __call__(self, texts: list[str]) -> np.ndarray:
        from ace.model.decoding import search_texts
        rows, _, _ = search_texts(self.model, self.query_tokenizer, texts, self.trie, self.vocab, num_beams=self.beams,
                                  batch_size=len(texts), max_length=self.max_len)
        return rows


class AceHybridSearch(AceSearch):
    """The hybrid operating point (ace/newitems/hybrid.py): the constrained beam search's top-``beams``
    re-ranked by log P(identifier | q) + w x cos(query vector, item vector), the query vector
    pooled from the same encoder pass (one MiniLM pass for both). ``vectors``: an ItemVectorSet whose
    rows are the trie's item rows, set per corpus. Speed does not depend on w."""

    def __init__(self, *, weight: float = 1.0, **kw):
        super().__init__(**kw)
        self.weight, self.vectors = weight, None

    def __call__(self, texts: list[str]) -> np.ndarray:
        from ace.model.decoding import constrained_beam_search
        from ace.newitems.candidates import sentence_vectors
        from ace.newitems.hybrid import rerank

        device = next(self.model.parameters()).device
        enc = self.query_tokenizer(list(texts), max_length=self.max_len)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        state: dict = {}
        with torch.inference_mode():
            items, logprob = constrained_beam_search(self.model, ids, mask, self.trie, self.vocab, num_beams=self.beams,
                                                     state=state)
        rows = items.cpu().numpy()                                                         # (B, beams)
        cos = self.vectors.cosine(sentence_vectors(state["last_hidden"], mask), rows)      # (B, beams)
        ranked, _ = rerank(rows, logprob.cpu().numpy(), cos, self.weight)     # whole identifier (hybrid.levels full)
        return ranked[:, :TOP_K]


class DenseSearch:
    """Text -> item rows (B, 10) by text encoder (+ projection to D) and inner-product top-10."""

    family = "DT"

    def __init__(self, *, name: str, encoder, projection: torch.Tensor | None, backend: str, device: str,
                 fixed_bytes: int):
        self.name, self.encoder, self.projection, self.backend = name, encoder, projection, backend
        self.device, self.fixed_bytes = device, fixed_bytes
        self.items = self.index = self.owner = None

    def encode(self, texts: list[str]) -> np.ndarray:
        q = self.encoder.encode(texts)                                              # (B, 384)
        if self.projection is not None:
            q = torch.nn.functional.normalize(torch.from_numpy(q) @ self.projection, dim=1).numpy()  # (B, D)
        return np.ascontiguousarray(q, dtype=np.float32)

    def search_vectors(self, q: np.ndarray) -> np.ndarray:
        if self.backend == "torch":
            scores = torch.from_numpy(q).to(self.device) @ self.items.T                 # (B, N)
            return scores.topk(min(TOP_K, scores.shape[1]), dim=1).indices.cpu().numpy()
        return self.index.search(q, TOP_K)[1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.search_vectors(self.encode(texts))


def build_ace_searchers(cfg: EfficiencyConfig, level_sizes, texts: list[str], device: str) -> list[AceSearch]:
    """One searcher per (--ace shape, precision); int8 only on CPU. A shape with prototype-aware heads
    (``prototype_levels``) gets prototype tables of the identifier vectors' dimension (the largest of
    ``cfg.dims``, which the identifiers are fitted on); their values do not change the speed."""
    from ace.model.decoding import quantize_dynamic_int8
    from ace.model.modeling import AceModel
    from ace.model.config import ace_model_config
    from ace.model.tokens import IdentifierVocab, QueryTokenizer

    vocab = IdentifierVocab(level_sizes)
    out = []
    for spec in cfg.ace:
        name, path, overrides = parse_ace_spec(spec)
        section = load_model_section(path, overrides)
        ace_cfg, enc_path = ace_model_config(section, level_sizes, max(cfg.dims))
        if enc_path:
            qtok = QueryTokenizer.from_pretrained(enc_path, max_length=ace_cfg.max_query_length)
        else:
            qtok = QueryTokenizer.train(texts, vocab_size=section.query_vocab_size,
                                        model_type=section.query_tokenizer_type, max_length=ace_cfg.max_query_length)
            ace_cfg.query_vocab_size = qtok.vocab_size
        torch.manual_seed(cfg.seed)
        model = AceModel(ace_cfg).to(device).eval()
        shape = {"spec": spec, "params": sum(p.numel() for p in model.parameters()), "d_model": ace_cfg.d_model,
                 "encoder": f"pretrained ({section.pretrained_encoder})" if enc_path else "from scratch",
                 "encoder_layers": ace_cfg.encoder_layers, "decoder_layers": ace_cfg.decoder_layers,
                 "query_vocab": ace_cfg.query_vocab_size, "arch": model_arch(section)}
        for precision in cfg.precisions:
            if precision == "int8":
                if device != "cpu":
                    continue                                   # dynamic int8 is a CPU serving mode
                m = quantize_dynamic_int8(model)
            else:
                m = model
            out.append(AceSearch(name=f"{name}-{precision}", model=m, query_tokenizer=qtok, vocab=vocab,
                                 beams=cfg.beams, fixed_bytes=state_dict_bytes(m), shape=shape))
            if cfg.hybrid_beams:
                out.append(AceHybridSearch(name=f"{name}-{precision}-hybrid", model=m, query_tokenizer=qtok, vocab=vocab,
                                           beams=cfg.hybrid_beams, fixed_bytes=state_dict_bytes(m),
                                           shape=shape | {"hybrid_storage": cfg.hybrid_storage}))
    return out


def hybrid_item_vectors(dim: int, n: int, vectors: dict, storage: str, seed: int):
    """ItemVectorSet of the first ``n`` items in the query encoder's dimension ``dim``: the corpus vectors
    when they have it (the identifiers come from them), else a synthetic mixture of that dimension."""
    from ace.bench.synthetic import mixture_embeddings
    from ace.newitems.hybrid import ItemVectorSet

    x = np.asarray(vectors[dim][:n]) if dim in vectors else mixture_embeddings(n, dim, seed=seed)
    return ItemVectorSet.build([str(i) for i in range(n)], x, storage)


def attach_item_vectors(searchers: list[AceHybridSearch], vectors: dict, n: int, cfg: EfficiencyConfig) -> None:
    """Each hybrid row's item vectors (``hybrid_item_vectors``, one set per dimension) and their bytes."""
    from ace.newitems.hybrid import query_dim

    built: dict = {}
    for s in searchers:
        d = query_dim(s.model)
        if d not in built:
            built[d] = hybrid_item_vectors(d, n, vectors, cfg.hybrid_storage, cfg.seed)
        s.vectors = built[d]
        s.data_bytes = int(round(built[d].bytes_per_item() * n)) + int(built[d].shared_bytes())


def attach_dense_corpus(searchers: list[DenseSearch], vectors: np.ndarray, cfg: EfficiencyConfig) -> dict:
    """Build each DT searcher's index over ``vectors``; returns {backend: (build_s, data_bytes, ann info)}
    (ANN indexes tuned to ``cfg.ann_target``: ``ace.bench.ann_baselines.tuned_index``).

    On CPU the torch matrix is a view of the faiss flat index's vectors when both are measured (one
    copy of N x D in memory; each method's data bytes are still counted as if it stood alone)."""
    import faiss
    n, d = vectors.shape
    info, flat = {}, None
    for s in sorted(searchers, key=lambda s: s.backend != "faiss_flat"):              # faiss_flat first
        t = time.perf_counter()
        if s.backend == "torch":
            dense = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d) if flat is not None else \
                np.ascontiguousarray(vectors, dtype=np.float32)
            s.items = torch.from_numpy(dense).to(s.device)                           # (N, D)
            s.owner = flat                                     # keeps the viewed faiss storage alive
            info[s.backend] = (time.perf_counter() - t, s.items.numel() * s.items.element_size(), None)
        elif s.backend == "faiss_flat":
            s.index = flat = faiss.IndexFlatIP(d)
            for i in range(0, n, 100_000):
                s.index.add(np.ascontiguousarray(vectors[i:i + 100_000], dtype=np.float32))
            info[s.backend] = (time.perf_counter() - t, faiss_index_bytes(s.index), None)
        else:
            s.index, ann = tune_ann(s.backend, vectors, cfg)
            info[s.backend] = (ann["build_s"], faiss_index_bytes(s.index), ann)
    return info


def tune_ann(backend: str, vectors: np.ndarray, cfg: EfficiencyConfig):
    """(index at its tuned setting, info): tuned on ``cfg.tune_queries`` near-item query vectors drawn
    with another seed than the reported near-item recall's."""
    rows, tq = near_item_sample(vectors, cfg.tune_queries, seed=cfg.seed + 7919)
    print(f"  tuning {backend} over {vectors.shape[0]:,} x {vectors.shape[1]} to recall@10 >= {cfg.ann_target} ...",
          flush=True)
    index, info = tuned_index(backend, vectors, tq, exact_top_k(vectors, tq), target=cfg.ann_target,
                              hnsw_builds=parse_hnsw_builds(cfg.hnsw_builds), nlist_factor=cfg.ivf_nlist_factor,
                              pq_bytes=cfg.pq_bytes, seed=cfg.seed, cache_dir=cfg.cache_dir,
                              threads=cfg.build_threads or cfg.threads, search_threads=cfg.threads)
    print(f"  {backend}: {info['params']}, tune recall@10 {info['tune_recall']:.3f} "
          f"({'met' if info['met'] else 'MISSED'}), build {info['build_s']:.0f} s", flush=True)
    return index, info


def ann_recalls(approx, exact, text_batches: list[list[str]], vectors: np.ndarray, cfg: EfficiencyConfig) -> dict:
    """recall@10 vs exact on the benchmark's text queries and on near-item query vectors (seed
    ``cfg.seed``, not the tuning seed), and how often a near-item query's own item is in the top-10."""
    qv = approx.encode([t for b in text_batches for t in b])
    rows, near = near_item_sample(vectors, len(qv), seed=cfg.seed)
    ex_near = exact.search_vectors(near)
    ann_near = approx.search_vectors(near)
    return {"recall_at_10_vs_exact": ann_recall(approx.search_vectors(qv), exact.search_vectors(qv)),
            "recall_at_10_near_items": ann_recall(ann_near, ex_near),
            "own_item_top10": {"ann": own_item_rate(ann_near, rows), "exact": own_item_rate(ex_near, rows)}}


# ------------------------------------------------------------------------------ measurement

def measure(methods: list, batches: list[list[str]], latency_texts: list[str], repeats: int, desc: str) -> dict:
    """Interleaved passes: {method name: {"qps": [per repeat], "latency_ms": [...]}}."""
    from tqdm import tqdm
    for m in methods:                                                                # warm-up
        m(batches[0])
        m(latency_texts[:1])
    out = {m.name: {"qps": [], "latency_ms": []} for m in methods}
    n_queries = sum(len(b) for b in batches)
    for r in tqdm(range(repeats), desc=desc, leave=False):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            t = time.perf_counter()
            for b in batches:
                m(b)
            out[m.name]["qps"].append(n_queries / (time.perf_counter() - t))
            for q in latency_texts:
                t = time.perf_counter()
                m([q])
                out[m.name]["latency_ms"].append(1000 * (time.perf_counter() - t))
    return out


def run(cfg: EfficiencyConfig, *, command: str = "", partial: Path | None = None) -> dict:
    """Measure every method at every (device, N, D); returns the JSON-able result (rows so far are
    written to ``partial`` after every group, so a long run that is stopped keeps its figures)."""
    import faiss

    from ace.data.encoders import TextEncoder
    from identifiers.trie import FlatTrie

    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    load_before = os.getloadavg()
    t_start = time.time()
    need = cfg.batch * cfg.num_batches + cfg.latency_queries
    texts = load_queries(cfg.queries, need=need, seed=cfg.seed)
    batches = [texts[i * cfg.batch:(i + 1) * cfg.batch] for i in range(cfg.num_batches)]
    latency_texts = texts[cfg.batch * cfg.num_batches:need]
    id_config = identifier_config(cfg.id_overrides)
    level_sizes = id_config.level_sizes
    n_max, id_dim = max(cfg.sizes), max(cfg.dims)
    vectors = {d: item_vectors(n_max, d, seed=cfg.seed, cache_dir=cfg.cache_dir) for d in cfg.dims}

    all_codes, id_s = None, None
    if cfg.ace:
        print(f"identifiers ({cfg.identifiers}) of {n_max:,} items x {id_dim}-d ...", flush=True)
        all_codes, id_s = corpus_identifiers(vectors[id_dim], cfg, id_config)
        torch.set_num_threads(cfg.threads)                  # the identifier fit may change the thread count
    if cfg.prepare_only:
        for n in cfg.sizes:
            for d in cfg.dims:
                for b in (b for b in cfg.dt_backends if b in ANN_BACKENDS):
                    if not (cfg.hnsw_max_n and n > cfg.hnsw_max_n):
                        tune_ann(b, vectors[d][:n], cfg)
        return {"prepared": cfg.cache_dir, "identifier_s": id_s}

    rows, ratios, shapes = [], [], {}
    for device in resolve_devices(cfg.devices):
        ace = build_ace_searchers(cfg, level_sizes, texts, device) if cfg.ace else []
        shapes.update({s.name: s.shape for s in ace})
        backends = [b for b in cfg.dt_backends if b == "torch" or device == "cpu"]   # faiss-cpu only
        encoder = TextEncoder(cfg.text_encoder, device=device) if backends else None
        enc_bytes = state_dict_bytes(encoder.model) if encoder else 0
        for n in cfg.sizes:
            trie_s = 0.0
            if ace:
                codes = all_codes[:n]
                t = time.perf_counter()
                trie = FlatTrie.from_codes(codes, level_sizes)
                trie_s = time.perf_counter() - t
                for s in ace:
                    s.trie = trie
                ace_data = trie_bytes(trie) + codes.nbytes
                attach_item_vectors([s for s in ace if isinstance(s, AceHybridSearch)], vectors, n, cfg)
            for d in cfg.dims:
                gen = torch.Generator().manual_seed(cfg.seed + d)
                proj = None if encoder is None or d == encoder.dim else \
                    torch.randn(encoder.dim, d, generator=gen) / encoder.dim ** 0.5     # (384, D)
                extra = 0 if proj is None else proj.numel() * 4
                dense = [DenseSearch(name=f"DT-{b}", encoder=encoder, projection=proj, backend=b, device=device,
                                     fixed_bytes=enc_bytes + extra)
                         for b in backends if not (b in ANN_BACKENDS and cfg.hnsw_max_n and n > cfg.hnsw_max_n)]
                built = attach_dense_corpus(dense, vectors[d][:n], cfg)
                group = f"{device} N={n:,} D={d}"
                timings = measure(ace + dense, batches, latency_texts, cfg.repeats, group)
                exact = [s for s in dense if s.backend not in ANN_BACKENDS]
                recalls = {s.name: ann_recalls(s, exact[0], batches, vectors[d][:n], cfg)
                           for s in dense if s.backend in ANN_BACKENDS and exact}
                for s in ace + dense:
                    tm = timings[s.name]
                    is_ace = s.family == "ACE"
                    row = {"device": device, "n": n, "dim": d, "family": s.family, "method": s.name,
                           "load_after": os.getloadavg(),
                           "qps_median": statistics.median(tm["qps"]), "qps_best": max(tm["qps"]), "qps_runs": tm["qps"],
                           **latency_summary(tm["latency_ms"]),
                           "build_s": trie_s if is_ace else built[s.backend][0],
                           "identifier_s": id_s if is_ace else None,
                           "recall_at_10_vs_exact": None, "recall_at_10_near_items": None,
                           **recalls.get(s.name, {}), "ann": None if is_ace else built[s.backend][2],
                           **bytes_per_item(fixed_bytes=s.fixed_bytes, n=n,
                                                    data_bytes=ace_data + s.data_bytes if is_ace else built[s.backend][1])}
                    rows.append(row)
                    print(f"[{group}] {s.name}: {row['qps_median']:.0f} q/s, p50 {row['p50_ms']:.1f} ms, "
                          f"p99 {row['p99_ms']:.1f} ms", flush=True)
                ratios += group_ratios([r for r in rows if (r["device"], r["n"], r["dim"]) == (device, n, d)])
                for s in dense:
                    s.items = s.index = s.owner = None
                if partial is not None:
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(json.dumps({"command": command, "rows": rows, "ratios": ratios}, indent=1))
    result = {"command": command, "config": to_dict(cfg), "level_sizes": list(level_sizes), "ace_shapes": shapes,
              "text_encoder_dim": encoder.dim if encoder else None,
              "identifier_fit_s": id_s,
              "query_tokens_note": "end-to-end: tokenization/encoding included for every method",
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "faiss": faiss.__version__, "threads": cfg.threads,
                          "load_before": load_before, "load_after": os.getloadavg(),
                          "seconds": time.time() - t_start},
              "rows": rows, "ratios": ratios}
    result["targets"] = targets(result)
    return result


def group_ratios(group: list[dict]) -> list[dict]:
    """ACE q/s / DT q/s for every (ACE, DT) pair measured in one (device, N, D) group."""
    out = []
    for a in (r for r in group if r["family"] == "ACE"):
        for b in (r for r in group if r["family"] == "DT"):
            out.append({"device": a["device"], "n": a["n"], "dim": a["dim"], "ace": a["method"], "dt": b["method"],
                        "qps_ratio": a["qps_median"] / b["qps_median"],
                        "p50_ratio": b["p50_ms"] / a["p50_ms"]})
    return out


def targets(result: dict) -> list[dict]:
    """The issue's targets at the largest N: ACE >= 3x DT exact (the faster exact backend) and >= DT+HNSW."""
    out = []
    rows, ratios = result["rows"], result["ratios"]
    n = max(r["n"] for r in rows)
    for (device, dim) in sorted({(r["device"], r["dim"]) for r in rows if r["n"] == n}):
        group = [r for r in ratios if (r["device"], r["n"], r["dim"]) == (device, n, dim)]
        for ace in dict.fromkeys(r["ace"] for r in group):
            mine = {r["dt"]: r["qps_ratio"] for r in group if r["ace"] == ace}
            exact = [v for k, v in mine.items() if k in ("DT-torch", "DT-faiss_flat")]
            if exact:
                v = min(exact)
                out.append({"device": device, "n": n, "dim": dim, "ace": ace, "target": "ACE >= 3x DT exact",
                            "ratio": v, "met": v >= 3.0})
            if "DT-faiss_hnsw" in mine:
                v = mine["DT-faiss_hnsw"]
                out.append({"device": device, "n": n, "dim": dim, "ace": ace, "target": "ACE >= DT+HNSW",
                            "ratio": v, "met": v >= 1.0})
    return out


# ------------------------------------------------------------------------------ report

def markdown(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    lines = ["# End-to-end efficiency: ACE vs dual-tower search", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, faiss {m['faiss']}, "
             f"{m['threads']} threads; load average before {fmt_load(m['load_before'])}, after "
             f"{fmt_load(m['load_after'])}; run took {m['seconds'] / 60:.1f} min.", "",
             f"Queries: batch {cfg['batch']} x {cfg['num_batches']} per throughput pass, {cfg['repeats']} passes "
             f"(median, best), batch-1 latency over {cfg['latency_queries']} x {cfg['repeats']} single queries. "
             f"ACE beam {cfg['beams']}, identifiers {cfg['identifiers']} {result['level_sizes']}; "
             f"ANN indexes tuned to recall@10 >= {cfg['ann_target']} of exact on {cfg['tune_queries']} held-out "
             f"near-item query vectors (HNSW builds tried {', '.join(cfg['hnsw_builds'])}; IVF nlist = "
             f"{cfg['ivf_nlist_factor']:g} x sqrt(N), PQ {cfg['pq_bytes']} bytes); settings per row below.", ""]
    for name, s in result["ace_shapes"].items():
        lines.append(f"- {name}: `{s['spec']}`: d_model {s['d_model']}, encoder {s['encoder']} "
                     f"({s['encoder_layers']} fused), {s['decoder_layers']} decoder layers, "
                     f"query vocab {s['query_vocab']}, {s['params'] / 1e6:.1f}M parameters (random weights)")
    lines += ["", "| device | N | D | method | q/s median (best) | p50 ms | p99 ms | build s | data B/item | "
              "total B/item (incl. model) | recall@10 vs exact: text queries / near-item queries |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rec = "" if r["recall_at_10_vs_exact"] is None else f"{r['recall_at_10_vs_exact']:.3f}"
        if r.get("recall_at_10_near_items") is not None:
            rec += f" / {r['recall_at_10_near_items']:.3f}"
        lines.append(f"| {r['device']} | {r['n']:,} | {r['dim']} | {r['method']} | {r['qps_median']:.0f} "
                     f"({r['qps_best']:.0f}) | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['build_s']:.2f} | "
                     f"{r['data_per_item']:,.0f} | {r['total_per_item']:,.0f} | {rec} |")
    lines += ["", "Ratios (ACE q/s / DT q/s, measured in the same group):", "",
              "| device | N | D | ACE | DT | q/s ratio | p50 speed-up |", "|---|---:|---:|---|---|---:|---:|"]
    for r in result["ratios"]:
        lines.append(f"| {r['device']} | {r['n']:,} | {r['dim']} | {r['ace']} | {r['dt']} | {r['qps_ratio']:.2f} | "
                     f"{r['p50_ratio']:.2f} |")
    lines += ann_markdown(result["rows"])
    lines += ["", "Targets at the largest N:", "", "| device | N | D | ACE | target | ratio | met |",
              "|---|---:|---:|---|---|---:|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['device']} | {t['n']:,} | {t['dim']} | {t['ace']} | {t['target']} | {t['ratio']:.2f} | "
                     f"{'yes' if t['met'] else 'no'} |")
    fit = result.get("identifier_fit_s")
    lines += ["", "build s: ACE = FlatTrie.from_codes over the N identifiers" +
              (f" (identifiers fitted once on the largest corpus in {fit:.0f} s, the first N rows used)" if fit else "") +
              "; DT-torch = copying the vectors into a tensor; faiss flat = add; HNSW / IVF = train + add of the "
              "chosen build (read from the cache when --cache-dir held it, with the time of the run that built it)."]
    lines += ["", "data B/item: ACE = trie arrays + identifier table (int64 codes) / N; DT = embedding matrix or "
              "faiss index / N. total B/item adds the fixed model bytes (ACE model state_dict; DT text encoder "
              "+ projection) / N."]
    if result.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in result["plots"])]
    if result.get("plot_notes"):
        lines += [""] + result["plot_notes"]
    return "\n".join(lines) + "\n"


def fmt_load(load) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def load_result(path: str) -> dict:
    """An efficiency.json written by an earlier run."""
    result = read_json(path, "efficiency JSON")
    missing = [k for k in ("config", "rows", "ratios", "targets", "machine", "ace_shapes") if k not in result]
    if missing:
        raise EfficiencyError(f"{path} is not an efficiency.json (missing {', '.join(missing)})")
    return result


# ------------------------------------------------------------------------------ CLI

def parse_args(argv: list[str] | None) -> tuple[EfficiencyConfig, Path, str | None]:
    d = EfficiencyConfig()
    ap = argparse.ArgumentParser(prog="python -m ace.bench efficiency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for efficiency.json / .md / PNG plots")
    ap.add_argument("--sizes", type=int, nargs="+", default=d.sizes)
    ap.add_argument("--dims", type=int, nargs="+", default=d.dims)
    ap.add_argument("--ace", action="append", default=None, metavar="NAME[=CONFIG.yaml][,key=value...]",
                    help="ACE model shape (repeatable; default: 'default' and 'minilm=configs/flickr30k_proxy.yaml')")
    ap.add_argument("--no-ace", action="store_true", help="measure DT only")
    ap.add_argument("--precisions", nargs="+", default=d.precisions, choices=PRECISIONS)
    ap.add_argument("--dt", nargs="*", default=d.dt_backends, choices=DT_BACKENDS, dest="dt_backends")
    ap.add_argument("--devices", nargs="+", default=d.devices, help="auto (cpu + cuda when present), cpu, cuda")
    for name in ("beams", "batch", "num_batches", "repeats", "latency_queries", "threads", "build_threads",
                 "hnsw_max_n", "seed", "tune_queries", "pq_bytes"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--ann-target", type=float, default=d.ann_target,
                    help="recall@10 vs exact search the ANN indexes are tuned to (default 0.95)")
    ap.add_argument("--hnsw-builds", nargs="+", default=d.hnsw_builds, metavar="M:EFC",
                    help="HNSW builds tried in order until one reaches the target (default 32:40 32:100)")
    ap.add_argument("--ivf-nlist-factor", type=float, default=d.ivf_nlist_factor,
                    help="IVF lists = factor x sqrt(N) (default 4)")
    ap.add_argument("--hybrid-beams", type=int, default=d.hybrid_beams,
                    help="> 0: also measure each ACE shape at the hybrid operating point, its top-B re-ranked by "
                         "log-prob + w x cosine (rows NAME-PRECISION-hybrid; HybridConfig.candidates is 50)")
    ap.add_argument("--hybrid-storage", choices=("float32", "int8"), default=d.hybrid_storage,
                    help="item vectors of the hybrid rows (their bytes per item are counted)")
    ap.add_argument("--identifiers", choices=("fitted", "random"), default=d.identifiers)
    ap.add_argument("--id", nargs="*", default=[], dest="id_overrides", metavar="KEY=VALUE",
                    help="IdentifierConfig overrides, e.g. --id K=64 max_u=256")
    ap.add_argument("--queries", default=None, help=".txt (one query a line) or a caption file")
    ap.add_argument("--text-encoder", default=d.text_encoder)
    ap.add_argument("--cache-dir", default=None, help="keep synthetic embeddings, identifiers and ANN indexes here")
    ap.add_argument("--prepare-only", action="store_true",
                    help="only build the cached identifiers and tuned ANN indexes (needs --cache-dir)")
    ap.add_argument("--trained", action="append", default=[], metavar="METHOD=RUN_DIR|QUALITY.json#NAME",
                    help="trained recall of one measured method (repeatable), e.g. minilm-fp32=runs/flickr30k_proxy "
                         "or minilm-int8='out/quality.json#ace_int8 beam 5'; must be the same shape and precision")
    ap.add_argument("--from-json", default=None, help="re-draw the Markdown and plots of an earlier efficiency.json "
                                                      "(e.g. with other --trained figures) instead of measuring")
    a = vars(ap.parse_args(argv))
    out = Path(a.pop("out"))
    from_json = a.pop("from_json")
    ace = [] if a.pop("no_ace") else (a.pop("ace") or d.ace)
    a.pop("ace", None)
    return EfficiencyConfig(ace=ace, **a), out, from_json


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg, out, from_json = parse_args(argv)
        for _, path, _ in parse_trained(cfg.trained):                 # fail before measuring, not after
            if not Path(path).exists():
                raise EfficiencyError(f"--trained source not found: {path}")
        if from_json:
            result = load_result(from_json)
            known = set(to_dict(EfficiencyConfig()))
            saved = {k: v for k, v in result["config"].items() if k in known}   # older runs: other keys
            cfg = EfficiencyConfig(**{**saved, "trained": cfg.trained})
            result["config"] = to_dict(cfg)
        else:
            result = run(cfg, command="python -m ace.bench efficiency " + " ".join(argv),
                         partial=out / "efficiency.partial.json")
        if cfg.prepare_only:
            print(json.dumps(result))
            return 0
        result["trained_recall"] = trained_figures(result, cfg.trained)
        out.mkdir(parents=True, exist_ok=True)
        result["plots"], result["plot_notes"] = plot(result, out, result["trained_recall"], batch=cfg.batch,
                                                     threads=cfg.threads)
    except (EfficiencyError, ConfigError, AnnError, PlotError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "efficiency.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "efficiency.md").write_text(text)
    print(text)
    return 0
