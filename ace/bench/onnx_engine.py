"""ONNX Runtime as the CPU engine of the frozen BERT query encoder (all-MiniLM-L6-v2), beside torch.

One graph serves both sides of the ACE-vs-DT comparison: ``EncoderGraph`` maps a tokenised batch to
ACE's fused encoder layers ``layer_states`` (B, S, N, d) (what ``AceEncoder`` stacks from the BERT's
last S hidden states) and DT's L2-normalised mean-pooled sentence vector ``sentence`` (B, d) (what
``SentenceTransformer('all-MiniLM-L6-v2').encode(normalize_embeddings=True)`` returns).

Engines (``ENGINES``), each a callable ``(input_ids, attention_mask) -> (layer_states, sentence)`` on
int64 numpy arrays:
- ``torch-fp32``: the graph in torch; ``torch-int8``: ``ace.model.decoding.quantize_dynamic_int8`` (what
  ``python -m ace.bench efficiency`` calls int8: per-tensor weight scales); ``torch-int8-pc``: the same with
  per-channel weight scales (``per_channel_dynamic_qconfig``), the scheme ``ort-int8`` uses.
- ``ort-fp32``: ``torch.onnx.export`` (TorchScript exporter, dynamic batch and sequence axes) run by
  onnxruntime; ``ort-int8``: that file through ``onnxruntime.quantization.quantize_dynamic`` (int8 weights).
- ``ort-fused-fp32`` / ``ort-fused-int8``: the same after onnxruntime's BERT graph optimiser
  (``onnxruntime.transformers.optimizer``: fused Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm).

Needs the optional extra ``ace-retrieval[onnx]`` (onnxruntime, plus onnx for the exporter). The graph, the
exporter, the int8 quantiser and ``OrtEncoder`` live in ``ace.model.onnx_encoder`` (serving uses them);
this module adds the benchmark-only engines. ``benchmarks/bench_onnx_engine.py`` measures the engines on real captions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ace.model.onnx_encoder import (Engine, EncoderGraph, OnnxEngineError, OrtEncoder, export_encoder,  # noqa: F401
                                    quantize_int8, require)

ENGINES = ("torch-fp32", "torch-int8", "torch-int8-pc", "ort-fp32", "ort-int8", "ort-fused-fp32", "ort-fused-int8")


def load_bert(path: str | Path, *, attn_implementation: str = "eager") -> nn.Module:
    """A BERT-style encoder from a local folder (``ace.data.encoders.resolve_text_model`` maps 'minilm').

    Eager attention: numerically the same as torch's default SDPA, and the pattern onnxruntime's
    optimiser fuses into its Attention op."""
    from transformers import AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise OnnxEngineError(f"no encoder model at {path}: expected a folder with config.json and weights")
    return AutoModel.from_pretrained(str(folder), attn_implementation=attn_implementation).eval()


def fuse_bert_graph(src: str | Path, dst: str | Path, *, num_heads: int, hidden_size: int) -> Path:
    """onnxruntime's offline BERT optimiser (fused attention and layer norms) on an exported file."""
    optimizer = require("onnxruntime.transformers.optimizer")
    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    model.save_model_to_file(str(dst))
    return Path(dst)


class TorchEncoder:
    """``EncoderGraph`` in torch, numpy in and out; ``int8`` = None, "tensor" or "channel": dynamic int8
    Linear layers with per-tensor or per-output-channel weight scales."""

    def __init__(self, bert: nn.Module, *, fused_layers: int = 3, int8: str | None = None):
        graph = EncoderGraph(bert, fused_layers)
        if int8 == "tensor":
            from ace.model.decoding import quantize_dynamic_int8
            graph = quantize_dynamic_int8(graph)
        elif int8 == "channel":
            import copy
            import warnings
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = quantize_dynamic(copy.deepcopy(graph), {nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)
        elif int8 is not None:
            raise OnnxEngineError(f"int8 must be None, 'tensor' or 'channel', got {int8!r}")
        self.graph = graph.eval()

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        layers, sentence = self.graph(torch.as_tensor(input_ids), torch.as_tensor(attention_mask))
        return layers.numpy(), sentence.numpy()


def build_engines(bert: nn.Module, workdir: str | Path, *, engines=ENGINES, fused_layers: int = 3,
                  threads: int = 1) -> dict[str, Engine]:
    """The named engines of one encoder; ONNX files (exported, fused, quantised) are written to ``workdir``."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise OnnxEngineError(f"unknown engine(s) {unknown or '(none given)'}; known: {', '.join(ENGINES)}")
    work = Path(workdir)
    files: dict[str, Path] = {}
    if any(e.startswith("ort-") for e in engines):
        require("onnxruntime")
        files["ort-fp32"] = export_encoder(bert, work / "encoder.onnx", fused_layers=fused_layers)
        if any(e.startswith("ort-fused") for e in engines):
            cfg = bert.config
            files["ort-fused-fp32"] = fuse_bert_graph(files["ort-fp32"], work / "encoder_fused.onnx",
                                                      num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
        for name in [e for e in engines if e.startswith("ort-") and e.endswith("-int8")]:
            src = files[name.replace("-int8", "-fp32")]
            files[name] = quantize_int8(src, src.with_name(src.stem + "_int8.onnx"))
    out: dict[str, Engine] = {}
    for name in engines:
        if name.startswith("torch-"):
            int8 = {"torch-int8": "tensor", "torch-int8-pc": "channel"}.get(name)
            out[name] = TorchEncoder(bert, fused_layers=fused_layers, int8=int8)
        else:
            out[name] = OrtEncoder(files[name], threads=threads)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (B, d) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise OnnxEngineError(f"cannot compare sentence vectors of shapes {a.shape} and {b.shape}")
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)
