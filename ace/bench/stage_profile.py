"""Where the time of one search goes: per-stage milliseconds per query for ACE and DT.

    python -m ace.bench profile --cache-dir benchmarks/out/cache14 --sizes 1000 100000 \\
        --ace minilm=configs/flickr30k_proxy.yaml --queries ../shared/data/flickr30k/flickr30k_val.json \\
        --out benchmarks/out/profile

ACE (same path as ``search_texts``: tokenise a batch, then ``constrained_beam_search``), timed by
wrapping the model's own methods for the duration of the profile:
``tokenise`` (query tokenizer), ``encode`` (``model.encode``: the encoder layers),
``decoder memory`` (``decoder.memory``: fused encoder states, once per query),
``decoder step d`` (``decoder.step`` at level d: the decoder layers + output projection),
``beam bookkeeping`` (the rest of the search: log-softmax, trie children, top-k, cache re-indexing,
leaf lookup), and for the hybrid operating point ``re-rank`` (``sentence_vectors`` of the same
encoder pass + int8 item-vector cosine of the beam's candidates + ``rerank``; item vectors = the
synthetic corpus rows (or a mixture sample of the model's d_model when it differs) as ``ItemVectorSet`` int8).
DT: ``encode`` (MiniLM, tokenisation included) and ``search`` (exact faiss flat, and faiss HNSW at the
efficiency benchmark's tuned setting, read from the same cache).
The hybrid rows decode ``--hybrid-beams`` beams (its top-B, default 50 = ``HybridConfig.candidates``).
Corpus, identifiers and weights as in ``ace.bench.efficiency`` (random weights: the cost does not depend on
training).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ace.bench.efficiency import (EfficiencyConfig, EfficiencyError, build_ace_searchers, corpus_identifiers,
                                  hybrid_item_vectors, identifier_config, item_vectors, load_queries)


class StageClock:
    """Seconds per stage name, collected by wrapping instance methods (``unwrap`` restores them)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._wrapped: list = []

    def wrap(self, obj, attr: str, name) -> None:
        orig = getattr(obj, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = orig(*args, **kwargs)
            self.seconds[name(args) if callable(name) else name] += time.perf_counter() - t
            return out

        setattr(obj, attr, timed)
        self._wrapped.append((obj, attr))

    def unwrap(self) -> None:
        for obj, attr in self._wrapped:
            delattr(obj, attr)                         # the class method shows through again
        self._wrapped.clear()


def profile_ace(searcher, trie, batches: list[list[str]], *, vectors=None, repeats: int = 3,
                beams: int | None = None) -> dict:
    """ms per query for each stage of one ACE searcher (median over repeats of the per-stage totals);
    ``beams``: the beam width (default the searcher's; the hybrid operating point decodes its top-B)."""
    from ace.model.decoding import constrained_beam_search
    from ace.newitems.candidates import sentence_vectors
    from ace.newitems.hybrid import rerank

    model, qtok = searcher.model, searcher.query_tokenizer
    runs = []
    for r in range(repeats + 1):                       # the first pass warms up and is dropped
        clock = StageClock()
        clock.wrap(model, "encode", "encode")
        clock.wrap(model.decoder, "memory", "decoder memory")
        clock.wrap(model.decoder, "step", lambda a: f"decoder step {a[1] + 1}")
        n = 0
        try:
            for b in batches:
                t = time.perf_counter()
                enc = qtok(list(b), max_length=searcher.max_len)
                clock.seconds["tokenise"] += time.perf_counter() - t
                state = {} if vectors is not None else None
                t = time.perf_counter()
                with torch.inference_mode():
                    items, logp = constrained_beam_search(model, enc.input_ids, enc.attention_mask, trie,
                                                          searcher.vocab, num_beams=beams or searcher.beams,
                                                          state=state)
                clock.seconds["search (total)"] += time.perf_counter() - t
                if vectors is not None:
                    t = time.perf_counter()
                    qv = sentence_vectors(state["last_hidden"], enc.attention_mask)
                    rows = items.numpy()
                    cos = vectors.cosine(qv, rows)
                    rerank(rows, logp.numpy(), cos, 1.0)
                    clock.seconds["re-rank"] += time.perf_counter() - t
                n += len(b)
        finally:
            clock.unwrap()
        s = dict(clock.seconds)
        inner = sum(v for k, v in s.items() if k in ("encode", "decoder memory") or k.startswith("decoder step"))
        s["beam bookkeeping"] = s.pop("search (total)") - inner
        if r:
            runs.append({k: 1000 * v / n for k, v in s.items()})
    return {k: float(np.median([x[k] for x in runs])) for k in runs[0]}


def profile_dt(dense, batches: list[list[str]], repeats: int = 3) -> dict:
    """ms per query: MiniLM encode (tokenise included) and index search, per DT searcher."""
    out = {}
    for s in dense:
        runs = []
        for r in range(repeats + 1):
            enc = srch = 0.0
            n = 0
            for b in batches:
                t = time.perf_counter()
                q = s.encode(b)
                enc += time.perf_counter() - t
                t = time.perf_counter()
                s.search_vectors(q)
                srch += time.perf_counter() - t
                n += len(b)
            if r:
                runs.append({"encode": 1000 * enc / n, "search": 1000 * srch / n})
        out[s.name] = {k: float(np.median([x[k] for x in runs])) for k in runs[0]}
    return out


def run(cfg: EfficiencyConfig, *, modes: list[str], hybrid_beams: int, command: str) -> dict:
    import faiss

    from ace.bench.efficiency import DenseSearch, attach_dense_corpus
    from ace.data.encoders import TextEncoder
    from identifiers.trie import FlatTrie

    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    load_before = os.getloadavg()
    texts = load_queries(cfg.queries, need=cfg.batch * cfg.num_batches, seed=cfg.seed)
    batches = [texts[i * cfg.batch:(i + 1) * cfg.batch] for i in range(cfg.num_batches)]
    id_config = identifier_config(cfg.id_overrides)
    dim = cfg.dims[0]
    vectors = item_vectors(max(cfg.sizes), dim, seed=cfg.seed, cache_dir=cfg.cache_dir)
    codes, _ = corpus_identifiers(vectors, cfg, id_config)
    torch.set_num_threads(cfg.threads)
    ace = build_ace_searchers(cfg, id_config.level_sizes, texts, "cpu")
    encoder = TextEncoder(cfg.text_encoder, device="cpu") if cfg.dt_backends else None
    rows = []
    for n in cfg.sizes:
        trie = FlatTrie.from_codes(codes[:n], id_config.level_sizes)
        item_sets = {}                                  # d_model -> int8 item vectors of the query encoder's dim
        for s in ace:
            d_model = s.model.config.d_model
            if "hybrid" in modes and d_model not in item_sets:
                item_sets[d_model] = hybrid_item_vectors(d_model, n, {dim: vectors}, "int8", cfg.seed)
            for mode in modes:
                beams = hybrid_beams if mode == "hybrid" else cfg.beams
                ms = profile_ace(s, trie, batches, vectors=item_sets.get(d_model) if mode == "hybrid" else None,
                                 repeats=cfg.repeats, beams=beams)
                rows.append({"n": n, "dim": dim, "method": f"{s.name} {mode}", "family": "ACE", "stages": ms,
                             "total_ms": sum(ms.values()), "beams": beams})
                print(f"[N={n:,}] {s.name} {mode}: {rows[-1]['total_ms']:.1f} ms/query "
                      + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
        if encoder is not None and dim == encoder.dim:
            dense = [DenseSearch(name=f"DT-{b}", encoder=encoder, projection=None, backend=b, device="cpu",
                                 fixed_bytes=0) for b in cfg.dt_backends]
            built = attach_dense_corpus(dense, vectors[:n], cfg)
            for name, ms in profile_dt(dense, batches, cfg.repeats).items():
                ann = built[name[3:]][2]
                rows.append({"n": n, "dim": dim, "method": name, "family": "DT", "stages": ms,
                             "total_ms": sum(ms.values()), "ann": None if ann is None else ann["params"]})
                print(f"[N={n:,}] {name}: {rows[-1]['total_ms']:.1f} ms/query {ms}", flush=True)
            for s in dense:
                s.items = s.index = s.owner = None
    return {"command": command, "config": {"sizes": cfg.sizes, "dim": dim, "ace": cfg.ace, "precisions": cfg.precisions,
                                           "beams": cfg.beams, "batch": cfg.batch, "num_batches": cfg.num_batches,
                                           "repeats": cfg.repeats, "threads": cfg.threads, "modes": modes,
                                           "hybrid_beams": hybrid_beams},
            "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}


def markdown(result: dict) -> str:
    c = result["config"]
    lines = ["# Where the time goes: ms per query by stage (batch %d, %d thread(s))" % (c["batch"], c["threads"]), "",
             f"Command: `{result['command']}`", "",
             f"Load average before {' / '.join(f'{x:.2f}' for x in result['load_before'])}, after "
             f"{' / '.join(f'{x:.2f}' for x in result['load_after'])}. Median of {c['repeats']} passes of "
             f"{c['num_batches']} x {c['batch']} queries; beam {c['beams']} (pure), "
             f"{c.get('hybrid_beams')} (hybrid: the top-B it re-ranks).", ""]
    for r in result["rows"]:
        total = r["total_ms"]
        parts = ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in r["stages"].items())
        extra = f" [{', '.join(f'{k} {v}' for k, v in r['ann'].items())}]" if r.get("ann") else ""
        beams = f" beam {r['beams']}" if r.get("beams") else ""
        lines.append(f"- N={r['n']:,} **{r['method']}**{beams}{extra}: {total:.2f} ms/query = {parts}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m ace.bench profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ace", action="append", default=None, metavar="NAME[=CONFIG.yaml][,key=value...]")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=("fp32", "int8"))
    ap.add_argument("--dt", nargs="*", default=["faiss_flat", "faiss_hnsw"], dest="dt_backends")
    ap.add_argument("--modes", nargs="+", choices=("pure", "hybrid"), default=["pure", "hybrid"],
                    help="ACE operating points: pure generative, hybrid (top-B re-ranked by log-prob + w x cosine)")
    ap.add_argument("--hybrid-beams", type=int, default=50, help="B of the hybrid mode (HybridConfig.candidates)")
    for name, default in (("beams", 5), ("batch", 100), ("num_batches", 2), ("repeats", 3), ("threads", 1),
                          ("seed", 0)):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    ap.add_argument("--queries", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--identifiers", choices=("fitted", "random"), default="fitted")
    ap.add_argument("--id", nargs="*", default=[], dest="id_overrides")
    a = vars(ap.parse_args(argv))
    out, modes, hybrid_beams = Path(a.pop("out")), a.pop("modes"), a.pop("hybrid_beams")
    a["dims"] = [a.pop("dim")]
    a["ace"] = a["ace"] or ["minilm=configs/flickr30k_proxy.yaml"]
    try:
        cfg = EfficiencyConfig(**a)
        if hybrid_beams < 1:
            raise EfficiencyError(f"--hybrid-beams must be >= 1, got {hybrid_beams}")
        result = run(cfg, modes=modes, hybrid_beams=hybrid_beams, command="python -m ace.bench profile " + " ".join(argv))
    except (EfficiencyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
