"""ace.bench.onnx_engine: a tiny BERT (built from a config) exported to ONNX gives torch's numbers in ONNX Runtime;
missing packages, wrong paths and bad engine names fail with a clear OnnxEngineError."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ace.bench.onnx_engine import (ENGINES, EncoderGraph, OnnxEngineError, OrtEncoder, TorchEncoder, build_engines,
                                   cosine_rows, export_encoder, load_bert, require)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(**TINY), add_pooling_layer=False).save_pretrained(folder)
    return folder


def inputs(batch=3, tokens=7, seed=1):
    """Random ids with [CLS]..[SEP]-like ends and right padding of different lengths (not the export shape)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY["vocab_size"], size=(batch, tokens)).astype(np.int64)
    lengths = np.linspace(tokens, 2, batch).astype(int)
    mask = (np.arange(tokens)[None] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def masked_max_diff(a, b, mask):
    return float(np.abs((a - b) * mask[:, None, :, None]).max())


def test_encoder_graph_outputs_fused_layers_and_unit_mean_pool(tiny_bert_dir):
    bert = load_bert(tiny_bert_dir)
    ids, mask = inputs()
    layers, sentence = TorchEncoder(bert, fused_layers=2)(ids, mask)
    with torch.no_grad():
        hidden = bert(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                      output_hidden_states=True).hidden_states
    assert layers.shape == (3, 2, 7, 32)
    np.testing.assert_allclose(layers[:, 0], hidden[-2].numpy(), atol=1e-6)
    m = mask[..., None].astype(np.float32)
    pooled = (hidden[-1].numpy() * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(sentence, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(OnnxEngineError, match="fused_layers=4"):
        EncoderGraph(bert, fused_layers=4)
    with pytest.raises(OnnxEngineError, match="int8 must be"):
        TorchEncoder(bert, int8="int4")


def test_ort_fp32_equals_torch_at_other_shapes_and_int8_stays_close(tiny_bert_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    bert = load_bert(tiny_bert_dir)
    engines = build_engines(bert, tmp_path, engines=ENGINES, fused_layers=3)
    assert (tmp_path / "encoder.onnx").is_file() and (tmp_path / "encoder_int8.onnx").is_file()
    for batch, tokens in ((1, 4), (3, 7), (5, 12)):     # dynamic axes: none of these is the export shape (2, 4)
        ids, mask = inputs(batch, tokens, seed=tokens)
        ref_layers, ref_sent = engines["torch-fp32"](ids, mask)
        for name in ("ort-fp32", "ort-fused-fp32"):
            layers, sent = engines[name](ids, mask)
            assert layers.shape == ref_layers.shape == (batch, 3, tokens, 32), name
            assert masked_max_diff(layers, ref_layers, mask) < 1e-4, name
            assert np.abs(sent - ref_sent).max() < 1e-5, name
        for name in ("torch-int8", "torch-int8-pc", "ort-int8", "ort-fused-int8"):
            layers, sent = engines[name](ids, mask)
            assert layers.shape == ref_layers.shape, name
            assert cosine_rows(sent, ref_sent).min() > 0.95, name
            assert np.abs(sent - ref_sent).max() > 0, f"{name} is not quantised"
    import onnx

    def ops(name):
        return {n.op_type for n in onnx.load(str(tmp_path / name)).graph.node}
    assert "MatMulInteger" in ops("encoder_int8.onnx") and "MatMulInteger" not in ops("encoder.onnx")
    assert "Attention" in ops("encoder_fused.onnx") and "Attention" not in ops("encoder.onnx")   # the optimiser fused


def test_an_exported_file_differs_from_another_model(tiny_bert_dir, tmp_path):
    """The comparison above can fail: a BERT with other weights gives other numbers."""
    pytest.importorskip("onnxruntime")
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    other = BertModel(BertConfig(**TINY), add_pooling_layer=False).eval()
    ort = OrtEncoder(export_encoder(other, tmp_path / "other.onnx"))
    ids, mask = inputs()
    _, ref = TorchEncoder(load_bert(tiny_bert_dir))(ids, mask)
    assert np.abs(ort(ids, mask)[1] - ref).max() > 1e-2


def test_missing_onnxruntime_is_named_with_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # import onnxruntime -> ImportError
    with pytest.raises(OnnxEngineError, match=r"onnxruntime.*ace-retrieval\[onnx\]"):
        require("onnxruntime")
    with pytest.raises(OnnxEngineError, match="onnxruntime"):
        OrtEncoder(tmp_path / "encoder.onnx")


def test_wrong_paths_and_engine_names(tiny_bert_dir, tmp_path):
    with pytest.raises(OnnxEngineError, match="no encoder model at"):
        load_bert(tmp_path / "nowhere")
    with pytest.raises(OnnxEngineError, match="unknown engine"):
        build_engines(load_bert(tiny_bert_dir), tmp_path, engines=("torch-fp16",))
    with pytest.raises(OnnxEngineError, match="shapes"):
        cosine_rows(np.ones((2, 3)), np.ones((3, 3)))
    pytest.importorskip("onnxruntime")
    with pytest.raises(OnnxEngineError, match="not found"):
        OrtEncoder(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(Exception):
        OrtEncoder(bad)


def test_benchmark_script_runs_on_a_tiny_model(tmp_path):
    """benchmarks/bench_onnx_engine.py end to end: tiny BERT + the MiniLM tokenizer, a few captions."""
    pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ace.data.encoders import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tmp_path / "model"
    torch.manual_seed(0)
    BertModel(BertConfig(**{**TINY, "vocab_size": len(tokenizer)}), add_pooling_layer=False).save_pretrained(model)
    tokenizer.save_pretrained(model)
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(["a dog runs on the beach", "two men play football", "a red car",
                                   "children laugh in a park while their parents watch"] * 3))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_onnx_engine

    res = bench_onnx_engine.main(["--model", str(model), "--captions", str(captions), "--n", "12", "--repeats", "2",
                                  "--batch-sizes", "1", "5", "--engines", "torch-fp32", "ort-fp32", "ort-int8",
                                  "--out", str(tmp_path / "out")])
    rows = {(r["engine"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {(e, b) for e in ("torch-fp32", "ort-fp32", "ort-int8") for b in (1, 5)}
    assert rows[("ort-fp32", 5)]["cos_min"] > 0.99999 and rows[("ort-fp32", 5)]["layer_max_abs_diff"] < 1e-4
    assert rows[("torch-fp32", 1)]["ratio"] == 1.0 and all(r["qps"] > 0 for r in rows.values())
    assert len(rows[("ort-int8", 1)]["passes_s"]) == 2
    assert (tmp_path / "out" / "onnx_engine.md").read_text().count("| ort-int8 |") == 2
