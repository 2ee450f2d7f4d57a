"""ACE search end to end with the query encoder run by ONNX Runtime: what the encoder speed-up is worth.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_onnx_ace_e2e.py [--n-queries 320] [--repeats 3]

The recipe's shape (configs/flickr30k_proxy.yaml: MiniLM encoder, last 3 layers fused, 2 decoder layers;
random decoder weights, so the search always runs its L steps) over the random identifiers of --items
items, built as ``python -m ace.bench efficiency`` builds it (``build_ace_searchers``). Methods:
``torch-fp32`` and ``torch-int8`` (whole model in torch), and the same models with ``model.encode``
replaced by the ONNX Runtime engine of ``ace.bench.onnx_engine`` (``ortenc-fp32`` on the fp32 model,
``ortenc-int8`` on the torch-int8 model: ORT int8 encoder, torch int8 decoder). Modes: pure (beam 5) and
the hybrid operating point's decode (top-50 beams; its re-rank, ~0.2 ms/query, is left out). DT's side
is its query encoder alone (its HNSW search is 0.06-0.3 ms/query, benchmarks/results/efficiency.md):
``dt-torch-fp32`` vs ``dt-ort-int8``. All methods interleaved in one process (order rotated each
repeat), median pass; ms/query and the ratio to the torch-fp32 row of the same mode and batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.bench.efficiency import (EfficiencyConfig, build_ace_searchers, identifier_config,  # noqa: E402
                                  load_queries)
from ace.bench.onnx_engine import build_engines, load_bert  # noqa: E402
from ace.bench.synthetic import random_codes  # noqa: E402
from ace.data.encoders import resolve_text_model  # noqa: E402
from ace.model.decoding import constrained_beam_search  # noqa: E402
from identifiers.trie import FlatTrie  # noqa: E402


def with_engine_encoder(model, engine):
    """``model`` whose ``encode`` (the one encoder pass of the beam search) runs ``engine`` instead."""
    def encode(input_ids, attention_mask):
        model.check_query_inputs(input_ids, attention_mask)
        layers, _ = engine(input_ids.numpy(), attention_mask.numpy())
        return torch.from_numpy(layers)
    model.encode = encode
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", default=str(ROOT.parent / "shared/data/flickr30k/flickr30k_val.json"))
    ap.add_argument("--ace", default="minilm=configs/flickr30k_proxy.yaml,prototype_levels=0",
                    help="the efficiency bench's NAME=SPEC (prototype heads need identifier vectors: off)")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--n-queries", type=int, default=320)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--beams", type=int, nargs="+", default=[5, 50], help="5 = pure, 50 = the hybrid's top-50")
    ap.add_argument("--batch1-queries", type=int, default=64, help="queries per batch-1 pass (batch 1 is slow)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/onnx_ace_e2e"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    cfg = EfficiencyConfig(ace=[args.ace], precisions=["fp32", "int8"], identifiers="random", sizes=[args.items])
    level_sizes = identifier_config([]).level_sizes
    trie = FlatTrie.from_codes(random_codes(args.items, level_sizes, np.random.default_rng(0)), level_sizes)
    texts = load_queries(args.captions, need=args.n_queries)[:args.n_queries]
    searchers = {s.name.rsplit("-", 1)[1]: s for s in build_ace_searchers(cfg, level_sizes, texts, "cpu")}
    qtok, vocab = searchers["fp32"].query_tokenizer, searchers["fp32"].vocab
    fused = searchers["fp32"].model.config.encoder_layers
    path = resolve_text_model("minilm")
    eng = build_engines(load_bert(path), out, engines=("ort-fp32", "ort-int8"), fused_layers=fused)
    eng.update(build_engines(load_bert(path, attn_implementation="sdpa"), out, engines=("torch-fp32",),
                             fused_layers=fused))
    import copy
    models = {"torch-fp32": searchers["fp32"].model, "torch-int8": searchers["int8"].model,
              "ortenc-fp32": with_engine_encoder(copy.deepcopy(searchers["fp32"].model), eng["ort-fp32"]),
              "ortenc-int8": with_engine_encoder(copy.deepcopy(searchers["int8"].model), eng["ort-int8"])}

    def ace(model, beams):
        def run(batch):
            with torch.inference_mode():
                constrained_beam_search(model, batch.input_ids, batch.attention_mask, trie, vocab, num_beams=beams)
        return run

    def dt(engine):
        return lambda batch: engine(batch.input_ids.numpy(), batch.attention_mask.numpy())

    methods = {("dt", 0, "dt-torch-fp32"): dt(eng["torch-fp32"]), ("dt", 0, "dt-ort-int8"): dt(eng["ort-int8"])}
    for beams in args.beams:
        for name, model in models.items():
            methods[("ace", beams, name)] = ace(model, beams)
    batches = {b: [qtok(texts[i:i + b], max_length=cfg_len(models)) for i in
                   range(0, args.batch1_queries if b == 1 else len(texts), b)] for b in args.batch_sizes}
    times = {(k, b): [] for k in methods for b in args.batch_sizes}
    keys = list(methods)
    for r in range(-1, args.repeats):                 # repeat -1 warms up and is dropped
        order = keys[r % len(keys):] + keys[:r % len(keys)] if r >= 0 else keys
        for b in args.batch_sizes:
            for k in order:
                t = time.perf_counter()
                for batch in batches[b]:
                    methods[k](batch)
                if r >= 0:
                    n = sum(len(x.input_ids) for x in batches[b])
                    times[(k, b)].append(1e3 * (time.perf_counter() - t) / n)
        print(f"repeat {r + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    for (family, beams, name), b in times:
        ms = statistics.median(times[((family, beams, name), b)])
        ref = statistics.median(times[((family, beams, "dt-torch-fp32" if family == "dt" else "torch-fp32"), b)])
        rows.append({"family": family, "beams": beams, "method": name, "batch": b, "ms_per_query": ms,
                     "speedup_vs_torch_fp32": ref / ms, "passes_ms": times[((family, beams, name), b)]})
    result = {"command": " ".join(sys.argv), "ace": args.ace, "items": args.items, "n_queries": len(texts),
              "batch1_queries": args.batch1_queries, "repeats": args.repeats, "load_before": load_before,
              "load_after": os.getloadavg(), "rows": rows}
    (out / "onnx_ace_e2e.json").write_text(json.dumps(result, indent=1))
    lines = ["| side | beams | method | batch | ms/query | speed-up vs torch fp32 |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['family']} | {r['beams'] or ''} | {r['method']} | {r['batch']} | {r['ms_per_query']:.2f} | "
              f"{r['speedup_vs_torch_fp32']:.2f} |" for r in rows]
    md = (f"load {load_before[0]:.1f} -> {result['load_after'][0]:.1f}\n\n" + "\n".join(lines) + "\n")
    (out / "onnx_ace_e2e.md").write_text(md)
    print(md)
    return result


def cfg_len(models) -> int:
    return models["torch-fp32"].config.max_query_length


if __name__ == "__main__":
    main()
