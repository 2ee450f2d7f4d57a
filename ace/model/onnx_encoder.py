"""The query encoder on ONNX Runtime (issue 14: "keep what wins"), for serving and the benchmarks.

``EncoderGraph`` maps a tokenised batch to ACE's fused encoder layers ``layer_states`` (B, S, N, d) (what
``AceEncoder`` stacks from the BERT's last S hidden states) and the L2-normalised mean-pooled sentence vector
``sentence`` (B, d). ``export_encoder`` writes it as an ONNX file (dynamic batch and sequence axes),
``quantize_int8`` makes the int8 file (per-channel weights), ``OrtEncoder`` runs a file on the CPU.

``attach_ort_encoder`` is what serving uses (``Retriever.from_run(encoder_engine=...)``, ``serve.py
--encoder-engine``): the run's own BERT encoder (frozen or fine-tuned) is exported once into the run's
cache (one file per model version and engine, written atomically) and ``model.encode`` runs it.
``ort-fp32`` gives the torch outputs (layer states within 1e-4) 2.1x faster at batch 1; ``ort-int8``
is faster still at a small quality cost (benchmarks/results/efficiency.md, "CPU inference engines").
Needs the optional extra ``ace-retrieval[onnx]`` (onnxruntime, and onnx for the exporter).
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ace.model.modeling import pooled_query

INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("layer_states", "sentence")
EXTRA = "pip install 'ace-retrieval[onnx]' (onnxruntime and onnx)"

log = logging.getLogger(__name__)

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


SERVING_ENGINES = ("torch", "ort-fp32", "ort-int8")


def encoder_fingerprint(bert: nn.Module, fused_layers: int) -> str:
    """Content hash of a BERT encoder's weights and the fused layer count: the name of its exported files."""
    import hashlib

    h = hashlib.sha256(f"fused={fused_layers}".encode())
    for name, t in sorted(bert.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _engine_file(cache: Path, fingerprint: str, engine: str) -> Path:
    """Where the export of the encoder with ``fingerprint`` for ``engine`` lives in ``cache``."""
    return cache / f"encoder-{fingerprint}-{engine}.onnx"


def _build(bert: nn.Module, fused: int, cache: Path, fingerprint: str, engine: str) -> Path:
    """Export (and for int8 quantise) ``bert`` unless its file exists; each file written atomically. Returns it."""
    path, fp32 = _engine_file(cache, fingerprint, engine), _engine_file(cache, fingerprint, "ort-fp32")
    if path.is_file():
        return path
    if not fp32.is_file():
        graph_bert = copy.deepcopy(bert).float().eval()
        graph_bert.config._attn_implementation = "eager"     # the pattern the exporter and ORT handle best
        tmp = fp32.with_name(f".{fp32.name}.{os.getpid()}.tmp")
        export_encoder(graph_bert, tmp, fused_layers=fused)
        os.replace(tmp, fp32)
    if engine == "ort-int8":
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        quantize_int8(fp32, tmp)
        os.replace(tmp, path)
    return path


def attach_ort_encoder(model, engine: str, cache_dir: str | Path, *, threads: int | None = None):
    """``model`` (an AceModel on the CPU) with ``encode`` run by ``engine`` (``SERVING_ENGINES``; "torch" leaves
    it as it is). The file is ``cache_dir/encoder-<fingerprint>-<engine>.onnx``, exported from the model's own
    BERT encoder on first use (``encoder_fingerprint``: a fine-tuned or folded encoder gets its own file)."""
    if engine not in SERVING_ENGINES:
        raise OnnxEngineError(f"unknown encoder engine {engine!r}; known: {', '.join(SERVING_ENGINES)}")
    if engine == "torch":
        return model
    bert = getattr(model.encoder, "bert", None)
    if bert is None:
        raise OnnxEngineError("the ONNX encoder engines run a pretrained BERT query encoder (model.pretrained_encoder); "
                              "this model's encoder was trained from scratch: use encoder_engine 'torch'")
    if next(model.parameters()).device.type != "cpu":
        raise OnnxEngineError(f"the ONNX encoder engines run on the CPU; the model is on {next(model.parameters()).device}")
    require("onnxruntime")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    fused = model.config.encoder_layers
    fingerprint = encoder_fingerprint(bert, fused)
    path = _build(bert, fused, cache, fingerprint, engine)
    threads = threads or torch.get_num_threads()
    try:
        runner = OrtEncoder(path, threads=threads)
    except Exception as exc:   # a cache file cut short (crash, full disk) or written by another onnxruntime
        log.warning("the cached ONNX encoder %s does not load (%s: %s); exporting it again", path, type(exc).__name__, exc)
        for stale in {path, _engine_file(cache, fingerprint, "ort-fp32")}:
            stale.unlink(missing_ok=True)
        _build(bert, fused, cache, fingerprint, engine)
        try:
            runner = OrtEncoder(path, threads=threads)
        except Exception as again:
            raise OnnxEngineError(f"the exported encoder {path} does not load in onnxruntime: {again}") from again

    def encode(input_ids, attention_mask):
        model.check_query_inputs(input_ids, attention_mask)
        layers, _ = runner(input_ids.cpu().numpy(), attention_mask.cpu().numpy())
        return torch.from_numpy(layers)

    model.encode = encode
    model.encoder_engine = engine
    return model
