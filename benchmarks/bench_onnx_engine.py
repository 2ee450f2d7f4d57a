"""CPU inference engines for the frozen MiniLM query encoder: torch fp32 / int8 vs ONNX Runtime fp32 / int8.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_onnx_engine.py \\
        [--captions ../shared/data/flickr30k/flickr30k_val.json] [--n 2000] [--batch-sizes 1 32] [--repeats 3]

The encoder is the same all-MiniLM-L6-v2 for ACE (the recipe's ``model.pretrained_encoder: minilm``,
its last 3 layers fused) and for DT's query tower, so an engine that wins here wins for both sides.
Every engine (``ace.bench.onnx_engine.ENGINES``) encodes the same ``--n`` real captions, tokenised
once by ACE's query tokenizer (max 40 tokens, the recipe's ``max_query_length``), at each batch size.
Passes are interleaved in one process: per repeat and batch size, every engine runs one full pass, in
an order rotated each repeat; the table reports the median pass. Tokenisation (the same for every
engine) is timed separately. Agreement with torch fp32: mean / min cosine of the sentence vectors, the
largest difference of the fused layer states over real tokens, and the overlap of each caption's 10
nearest captions (by sentence vector, among the --n) with torch fp32's.
Writes ``--out``/onnx_engine.json and .md (default benchmarks/out/onnx_engine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.bench.efficiency import load_queries, state_dict_bytes  # noqa: E402
from ace.bench.onnx_engine import ENGINES, OrtEncoder, build_engines, cosine_rows, load_bert  # noqa: E402
from ace.data.encoders import resolve_text_model  # noqa: E402
from ace.model.tokens import QueryTokenizer  # noqa: E402


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's k nearest other rows (inner product) under two sets of unit vectors."""
    k = min(k, len(a) - 1)
    if k < 1:
        return float("nan")
    def nearest(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k, axis=1)[:, :k]
    na, nb = nearest(a), nearest(b)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(na, nb)]))


def engine_bytes(engine) -> int:
    if isinstance(engine, OrtEncoder):
        return int(Path(engine.path).stat().st_size)
    return state_dict_bytes(engine.graph)


def run_pass(engine, batches) -> tuple[float, list[float], np.ndarray, list[np.ndarray]]:
    """One pass over the batches -> (seconds, per-call ms, sentence vectors, layer states)."""
    calls, sent, layers = [], [], []
    t0 = time.perf_counter()
    for ids, mask in batches:
        t = time.perf_counter()
        lay, s = engine(ids, mask)
        calls.append((time.perf_counter() - t) * 1e3)
        sent.append(s)
        layers.append(lay)
    return time.perf_counter() - t0, calls, np.concatenate(sent), layers


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", default=str(ROOT.parent / "shared/data/flickr30k/flickr30k_val.json"))
    ap.add_argument("--model", default="minilm", help="encoder folder, or 'minilm' (the offline all-MiniLM-L6-v2)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused-layers", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/onnx_engine"))
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    path = resolve_text_model(args.model)
    texts = load_queries(args.captions, need=args.n, seed=args.seed)[:args.n]
    tok = QueryTokenizer.from_pretrained(path, max_length=args.max_length)
    t0 = time.perf_counter()
    tokenised = {b: [tok(texts[i:i + b]) for i in range(0, len(texts), b)] for b in args.batch_sizes}
    tokenise_ms = (time.perf_counter() - t0) * 1e3 / (len(texts) * len(args.batch_sizes))
    batches = {b: [(q.input_ids.numpy(), q.attention_mask.numpy()) for q in qs] for b, qs in tokenised.items()}

    t0 = time.perf_counter()
    torch_names = [e for e in args.engines if e.startswith("torch-")]
    ort_names = [e for e in args.engines if e.startswith("ort-")]
    engines = {}
    if torch_names:   # torch as ACE and DT run it: transformers' default (SDPA) attention
        engines.update(build_engines(load_bert(path, attn_implementation="sdpa"), out, engines=torch_names,
                                     fused_layers=args.fused_layers, threads=args.threads))
    if ort_names:     # exported from eager attention (the same numbers), which the ORT optimiser can fuse
        engines.update(build_engines(load_bert(path), out, engines=ort_names, fused_layers=args.fused_layers,
                                     threads=args.threads))
    engines = {e: engines[e] for e in args.engines}
    build_s = time.perf_counter() - t0

    passes = {(e, b): [] for e in engines for b in args.batch_sizes}
    latencies = {(e, b): [] for e in engines for b in args.batch_sizes}
    vectors, layers = {}, {}
    names = list(engines)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for b in args.batch_sizes:
            for e in order:
                s, calls, sent, lay = run_pass(engines[e], batches[b])
                passes[(e, b)].append(s)
                latencies[(e, b)].extend(calls)
                vectors.setdefault((e, b), sent)
                layers.setdefault((e, b), lay)
            print(f"repeat {r + 1}/{args.repeats}, batch {b}: "
                  + ", ".join(f"{e} {len(texts) / passes[(e, b)][-1]:.0f} q/s" for e in order), flush=True)

    ref = names[0]
    rows = []
    for b in args.batch_sizes:
        base = statistics.median(passes[(ref, b)])
        for e in names:
            med = statistics.median(passes[(e, b)])
            cos = cosine_rows(vectors[(e, b)], vectors[(ref, b)])
            diff = max(float(np.abs((la - lr) * m[:, None, :, None]).max())
                       for la, lr, (_, m) in zip(layers[(e, b)], layers[(ref, b)], batches[b]))
            lat = np.asarray(latencies[(e, b)])
            rows.append({"engine": e, "batch": b, "qps": len(texts) / med, "ratio": base / med,
                         "passes_s": passes[(e, b)], "p50_ms_per_call": float(np.percentile(lat, 50)),
                         "p99_ms_per_call": float(np.percentile(lat, 99)),
                         "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "layer_max_abs_diff": diff,
                         "top10_overlap": top_k_overlap(vectors[(e, b)], vectors[(ref, b)]),
                         "model_bytes": engine_bytes(engines[e])})
    result = {"command": " ".join(sys.argv), "captions": args.captions, "n": len(texts), "model": path,
              "engines": names, "reference": ref, "batch_sizes": args.batch_sizes, "repeats": args.repeats,
              "threads": args.threads, "fused_layers": args.fused_layers, "max_length": args.max_length,
              "tokenise_ms_per_query": tokenise_ms, "build_s": build_s, "load_before": load_before,
              "load_after": os.getloadavg(), "platform": platform.platform(), "torch": torch.__version__,
              "onnxruntime": _version("onnxruntime"), "rows": rows}
    (out / "onnx_engine.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "onnx_engine.md").write_text(md)
    print(md)
    return result


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def markdown(res: dict) -> str:
    lines = [f"{res['n']} captions, {res['threads']} thread(s), median of {res['repeats']} interleaved passes, "
             f"load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}; tokenise "
             f"{res['tokenise_ms_per_query']:.3f} ms/query (not included below)", "",
             f"| engine | batch | queries/s | x {res['reference']} | p50 / p99 ms per call | cosine to {res['reference']} "
             "(mean / min) | max abs diff, layer states | top-10 overlap | model MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['qps']:.0f} | {r['ratio']:.2f} | "
                     f"{r['p50_ms_per_call']:.2f} / {r['p99_ms_per_call']:.2f} | {r['cos_mean']:.4f} / "
                     f"{r['cos_min']:.4f} | {r['layer_max_abs_diff']:.2g} | {r['top10_overlap']:.3f} | "
                     f"{r['model_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
