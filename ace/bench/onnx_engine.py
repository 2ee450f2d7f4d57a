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

Needs the optional extra ``ace-retrieval[onnx]`` (onnxruntime, plus onnx for the exporter).
``benchmarks/bench_onnx_engine.py`` measures the engines on real captions.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ace.model.modeling import pooled_query

ENGINES = ("torch-fp32", "torch-int8", "torch-int8-pc", "ort-fp32", "ort-int8", "ort-fused-fp32", "ort-fused-int8")
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("layer_states", "sentence")
EXTRA = "pip install 'ace-retrieval[onnx]' (onnxruntime and onnx)"

Engine = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class OnnxEngineError(ValueError):
    """A missing optional package, a wrong model path or a bad engine name; the message names it."""


def require(module: str):
    """Import an optional package of the ONNX engine, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OnnxEngineError(f"the ONNX engine needs the package '{module.split('.')[0]}': {EXTRA}") from exc


class EncoderGraph(nn.Module):
    """BertModel -> (last ``fused_layers`` hidden states stacked (B, S, N, d), unit mean-pooled sentence (B, d))."""

    def __init__(self, bert: nn.Module, fused_layers: int = 3):
        super().__init__()
        n = int(bert.config.num_hidden_layers)
        if not 1 <= fused_layers <= n:
            raise OnnxEngineError(f"fused_layers={fused_layers} must be in [1, {n}] (the encoder's layers)")
        self.bert, self.fused_layers = bert.eval(), int(fused_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        layers = torch.stack(out.hidden_states[-self.fused_layers:], dim=1)
        pooled = pooled_query(layers, attention_mask)
        return layers, pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_bert(path: str | Path, *, attn_implementation: str = "eager") -> nn.Module:
    """A BERT-style encoder from a local folder (``ace.data.encoders.resolve_text_model`` maps 'minilm').

    Eager attention: numerically the same as torch's default SDPA, and the pattern onnxruntime's
    optimiser fuses into its Attention op."""
    from transformers import AutoModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise OnnxEngineError(f"no encoder model at {path}: expected a folder with config.json and weights")
    return AutoModel.from_pretrained(str(folder), attn_implementation=attn_implementation).eval()


def export_encoder(bert: nn.Module, out_path: str | Path, *, fused_layers: int = 3, opset: int = 17) -> Path:
    """``EncoderGraph(bert)`` -> an ONNX file with dynamic batch and sequence axes (TorchScript exporter)."""
    require("onnx")
    import warnings

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = EncoderGraph(bert, fused_layers)
    ids = torch.tensor([[101, 1037, 3899, 102], [101, 1037, 102, 0]]) % int(bert.config.vocab_size)
    mask = (torch.arange(4)[None] < torch.tensor([[4], [3]])).long()
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "layer_states": {0: "batch", 2: "tokens"}, "sentence": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")   # TracerWarnings of transformers' mask helpers: shape-independent here
        torch.onnx.export(graph, (ids, mask), str(out), dynamo=False, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=opset)
    return out


def fuse_bert_graph(src: str | Path, dst: str | Path, *, num_heads: int, hidden_size: int) -> Path:
    """onnxruntime's offline BERT optimiser (fused attention and layer norms) on an exported file."""
    optimizer = require("onnxruntime.transformers.optimizer")
    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size)
    model.save_model_to_file(str(dst))
    return Path(dst)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime dynamic quantisation: int8 weights per output channel (per tensor: sentence-vector cosine
    to fp32 0.96 on Flickr30K captions, per channel 0.993), activations quantised per batch at run time."""
    quant, onnx = require("onnxruntime.quantization"), require("onnx")
    # DefaultTensorType: shape inference cannot type the outputs of the fused (contrib) ops
    quant.quantize_dynamic(str(src), str(dst), weight_type=quant.QuantType.QInt8, per_channel=True,
                           extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(dst)


class OrtEncoder:
    """An exported encoder file run by onnxruntime on the CPU with ``threads`` intra-op threads."""

    def __init__(self, path: str | Path, *, threads: int = 1):
        ort = require("onnxruntime")
        if not Path(path).is_file():
            raise OnnxEngineError(f"ONNX encoder file not found: {path}")
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(INPUTS):
            raise OnnxEngineError(f"{path} takes inputs {names}, not {list(INPUTS)}: not an exported encoder")

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        layers, sentence = self.session.run(list(OUTPUTS), feed)
        return layers, sentence


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
