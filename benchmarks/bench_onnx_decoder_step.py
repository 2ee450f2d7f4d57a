"""The decoder step on ONNX Runtime (issue 14, "try ORT for the query encoder and the decoder step").

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx_decoder_step.py [--batch-sizes 1 100] [--beams 5 50]
        [--positions 1 2 3] [--repeats 7] [--out benchmarks/out/onnx_decoder_step]

One ``AceDecoder.step`` (the work the beam search repeats once per identifier level) of the efficiency
benchmark's recipe shape (``--ace``, default the 6-layer MiniLM recipe of configs/flickr30k_proxy.yaml,
prototype heads included; random weights: the cost does not depend on training) is exported for each
(batch, beams, position) with its inputs explicit: the beams' tokens, the per-layer fused cross-attention
memory (computed once per query), the query mask, the pooled query (prototype heads) and the per-layer
self-attention key/value cache. It is run by torch fp32, torch dynamic int8 (the efficiency benchmark's
int8 rows, ``serve.py --quantize``), ORT fp32 and ORT int8 (dynamic, per channel:
``ace.model.onnx_encoder.quantize_int8``), interleaved, one thread each, on the encoder states of real
captions; the report gives ms per step (median of ``--repeats`` interleaved passes) and how close ORT's
logits are to torch's (max |diff|, top-1 agreement). The trie-constrained top-k and beam bookkeeping stay
in Python and are not timed here (``python -m ace.bench profile`` times them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ace.bench.efficiency import EfficiencyConfig, build_ace_searchers, identifier_config, load_queries  # noqa: E402
from ace.model.decoding import quantize_dynamic_int8  # noqa: E402
from ace.model.onnx_encoder import quantize_int8, require  # noqa: E402


class StepGraph(torch.nn.Module):
    """``decoder.step`` at a fixed ``position`` with flat tensor inputs/outputs (for the ONNX exporter)."""

    def __init__(self, decoder, position: int, memory_spec, cache_spec):
        super().__init__()
        self.decoder, self.position = decoder, position
        self.memory_spec, self.cache_spec = memory_spec, cache_spec

    def forward(self, tokens, mask, query, *flat):
        n_mem = self.memory_spec.num_leaves
        memory = tree_unflatten(list(flat[:n_mem]), self.memory_spec)
        cache = tree_unflatten(list(flat[n_mem:]), self.cache_spec) if self.cache_spec is not None else []
        logits, new_cache = self.decoder.step(tokens, self.position, memory, mask, cache, query=query)
        return (logits, *tree_flatten(new_cache)[0])


def step_inputs(model, qtok, texts: list[str], beams: int, position: int, vocab_size: int, seed: int = 0):
    """(tokens, mask, query, memory, cache) of a real step at ``position``: the encoder pass of ``texts``,
    and the cache left by ``position`` earlier steps over random beam tokens."""
    g = torch.Generator().manual_seed(seed)
    enc = qtok(texts, max_length=model.config.max_query_length)
    with torch.no_grad():
        layers = model.encode(enc.input_ids, enc.attention_mask)
        memory = model.decoder.memory(layers)
        mask = enc.attention_mask.bool()[:, None, None, :]
        query = model.prototype_query(layers, enc.attention_mask)
        cache = []
        for p in range(position):
            tok = torch.randint(1, vocab_size, (len(texts), beams), generator=g)
            _, cache = model.decoder.step(tok, p, memory, mask, cache, query=query)
    tokens = torch.randint(1, vocab_size, (len(texts), beams), generator=g)
    return tokens, mask, query, memory, cache


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ace", default="minilm=configs/flickr30k_proxy.yaml")
    ap.add_argument("--captions", default=str(ROOT.parent / "shared/data/flickr30k/flickr30k_val.json"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--beams", type=int, nargs="+", default=[5, 50])
    ap.add_argument("--positions", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ort = require("onnxruntime")
    torch.set_num_threads(args.threads)
    cfg = EfficiencyConfig(sizes=[1000], dims=[384], ace=[args.ace], precisions=["fp32"], threads=args.threads)
    level_sizes = identifier_config([]).level_sizes
    texts = load_queries(args.captions, need=max(args.batch_sizes), seed=0)
    (searcher,) = build_ace_searchers(cfg, level_sizes, texts, "cpu")
    model, qtok = searcher.model.eval(), searcher.query_tokenizer
    qdecoder = quantize_dynamic_int8(model).decoder                 # torch dynamic int8, once
    vocab_size = model.config.identifier_vocab_size
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for B in args.batch_sizes:
            for W in args.beams:
                for pos in args.positions:
                    if pos >= model.config.identifier_length:
                        continue
                    tokens, mask, query, memory, cache = step_inputs(model, qtok, texts[:B], W, pos, vocab_size)
                    flat_mem, mem_spec = tree_flatten(memory)
                    flat_cache, cache_spec = tree_flatten(cache)
                    cache_spec = cache_spec if cache else None
                    graph = StepGraph(model.decoder, pos, mem_spec, cache_spec).eval()
                    inputs = (tokens, mask, query, *flat_mem, *flat_cache)
                    names = ["tokens", "mask", "query"] + [f"m{i}" for i in range(len(flat_mem))] + \
                            [f"c{i}" for i in range(len(flat_cache))]
                    fp32 = Path(tmp) / f"step_b{B}_w{W}_p{pos}.onnx"
                    with torch.no_grad():
                        torch.onnx.export(graph, inputs, str(fp32), dynamo=False, input_names=names, opset_version=17)
                    int8 = quantize_int8(fp32, fp32.with_name(fp32.stem + "-int8.onnx"))
                    sessions = {e: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                                for e, p in (("ort-fp32", fp32), ("ort-int8", int8))}
                    arrays = {n: t.numpy() for n, t in zip(names, inputs)}
                    feeds = {e: {i.name: arrays[i.name] for i in sess.get_inputs()} for e, sess in sessions.items()}
                    with torch.no_grad():
                        ref = graph(*inputs)[0].numpy()
                    qgraph = StepGraph(qdecoder, pos, mem_spec, cache_spec)
                    runs = {"torch": lambda: graph(*inputs), "torch-int8": lambda: qgraph(*inputs)}
                    for e, sess in sessions.items():
                        runs[e] = (lambda s=sess, f=feeds[e]: s.run(None, f))
                    for fn in runs.values():                                # warm-up
                        fn()
                    ms = {e: [] for e in runs}
                    with torch.no_grad():
                        for r in range(args.repeats):                       # interleaved, order rotated
                            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
                            for e in order:
                                t = time.perf_counter()
                                runs[e]()
                                ms[e].append(1000 * (time.perf_counter() - t))
                        row = {"batch": B, "beams": W, "position": pos, "ms": {e: float(np.median(v)) for e, v in ms.items()}}
                        outs = {"torch-int8": qgraph(*inputs)[0].numpy()} | {e: s.run(None, feeds[e])[0]
                                                                             for e, s in sessions.items()}
                        for e, out in outs.items():
                            row[f"{e} max_abs_diff"] = float(np.abs(out - ref).max())
                            row[f"{e} top1_agree"] = float((out.argmax(-1) == ref.argmax(-1)).mean())
                    row["speedup"] = {e: row["ms"]["torch"] / row["ms"][e] for e in outs}
                    rows.append(row)
                    print(f"B={B} W={W} pos={pos}: torch {row['ms']['torch']:.2f} ms, torch-int8 {row['ms']['torch-int8']:.2f} "
                          f"({row['speedup']['torch-int8']:.2f}x, top-1 agree {row['torch-int8 top1_agree']:.3f}), ort-fp32 {row['ms']['ort-fp32']:.2f} "
                          f"({row['speedup']['ort-fp32']:.2f}x), ort-int8 {row['ms']['ort-int8']:.2f} "
                          f"({row['speedup']['ort-int8']:.2f}x); top-1 agree fp32 {row['ort-fp32 top1_agree']:.3f} "
                          f"int8 {row['ort-int8 top1_agree']:.3f}, max|diff| fp32 {row['ort-fp32 max_abs_diff']:.1e}",
                          flush=True)
    result = {"command": "python benchmarks/bench_onnx_decoder_step.py " + " ".join(argv or sys.argv[1:]),
              "threads": args.threads, "ace": args.ace, "load": os.getloadavg(), "rows": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decoder_step.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
