"""Serving with the query encoder on ONNX Runtime (ace.model.onnx_encoder.attach_ort_encoder,
Retriever.from_run(encoder_engine=...), serve.py --encoder-engine) on a tiny run with the recipe's frozen
all-MiniLM-L6-v2 encoder (it ships offline)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ace.serving.retriever import Retriever, RetrieverError

if os.environ.get("CI"):   # CI installs the extra (.ci/run): there these tests must run, not skip
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
else:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    from ace.config import load_config
    from ace.pipeline.run_config import RunConfig
    from ace.pipeline.stages import Pipeline
    from tests.test_pipeline import make_corpus

    tmp = tmp_path_factory.mktemp("onnx_run")
    corpus = make_corpus(tmp / "corpus.jsonl", dim=24)
    cfg = tmp / "minilm.yaml"
    cfg.write_text(f"""
name: tiny-minilm
run_dir: {tmp / 'run'}
device: cpu
corpus: {{path: {corpus}}}
split: {{test_captions: [-1]}}
encoder: {{image: {{kind: precomputed}}, dim: 24}}
identifiers: {{K: 4, codebook_size: 4, M: 2, max_u: 1024, rqvae_max_steps: 60, kmeans_n_init: 1}}
querygen: {{backend: captions}}
model: {{pretrained_encoder: minilm, d_model: 384, n_heads: 6, encoder_layers: 3, decoder_layers: 1, ffn_dim: 64, max_query_length: 16}}
training: {{freeze_encoder: true, batch_size: 30, max_steps: 30, warmup_steps: 5, lr: 3.0e-3, checkpoint_every: 30, eval_every: 0, num_beams: 5, eval_top_k: 5, progress: false}}
eval: {{num_beams: [5], top_k: 5}}
""")
    Pipeline(load_config(RunConfig, cfg), progress=False).run_all(until="train")
    return tmp / "run"


QUERIES = ["a red square on a plain background", "something green", "drums", "a small blue circle moving left"]


def _search(run, engine, **kw):
    r = Retriever.from_run(run, device="cpu", fallback=False, encoder_engine=engine, **kw)
    try:
        return r, [[(h.item_id, h.score) for h in row] for row in r.search(QUERIES, k=5, num_beams=5)]
    finally:
        r.close()


def test_ort_fp32_serves_the_torch_results_and_int8_stays_close(minilm_run, tmp_path):
    run = Path(shutil.copytree(minilm_run, tmp_path / "run"))
    _, torch_hits = _search(run, "torch")
    r, ort_hits = _search(run, "ort-fp32")
    assert getattr(r.model, "encoder_engine", None) == "ort-fp32"
    assert [[i for i, _ in row] for row in ort_hits] == [[i for i, _ in row] for row in torch_hits]
    for a, b in zip(ort_hits, torch_hits):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-3)
    files = sorted(p.name for p in (run / "cache" / "onnx").iterdir())
    assert len(files) == 1 and files[0].endswith("-ort-fp32.onnx")
    mtime = (run / "cache" / "onnx" / files[0]).stat().st_mtime_ns
    r8, int8_hits = _search(run, "ort-int8")
    assert len(int8_hits) == len(QUERIES) and all(len(row) == 5 for row in int8_hits)
    # the int8 weights change the encoder's numbers a little, not the encoder: its pooled query vectors stay
    # close to torch's (the benchmarks' criterion, cosine > 0.95 on real captions)
    from ace.model.modeling import pooled_query

    enc = r.query_tokenizer(QUERIES, max_length=r.model.config.max_query_length)
    with torch.no_grad():
        ref = pooled_query(r.model.encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask).layer_states,
                           enc.attention_mask)
        got = pooled_query(r8.model.encode(enc.input_ids, enc.attention_mask), enc.attention_mask)
    assert float(torch.nn.functional.cosine_similarity(ref, got, dim=-1).min()) > 0.95
    assert (run / "cache" / "onnx" / files[0]).stat().st_mtime_ns == mtime      # the fp32 export is reused
    assert {p.name.rsplit("-", 2)[-2] + "-" + p.name.rsplit("-", 1)[-1] for p in (run / "cache" / "onnx").iterdir()} \
        == {"ort-fp32.onnx", "ort-int8.onnx"}


def test_a_changed_encoder_gets_its_own_export_and_quantise_composes(minilm_run, tmp_path):
    """The file name is a fingerprint of the encoder's weights: a fine-tuned encoder never runs an
    older export. --quantize (torch int8 decoder) with an ONNX encoder keeps the ONNX encode."""
    from ace.model.modeling import AceModel

    run = Path(shutil.copytree(minilm_run, tmp_path / "run"))
    _search(run, "ort-fp32")
    model = AceModel.from_pretrained(str(run / "model"))
    with torch.no_grad():
        model.encoder.bert.embeddings.word_embeddings.weight.mul_(1.01)
    model.save_pretrained(str(run / "model"))
    _search(run, "ort-fp32")
    assert len(list((run / "cache" / "onnx").glob("encoder-*-ort-fp32.onnx"))) == 2
    r, hits = _search(run, "ort-fp32", quantize=True)
    assert getattr(r.model, "encoder_engine", None) == "ort-fp32" and all(len(row) == 5 for row in hits)


def test_a_corrupt_cached_export_is_rebuilt_with_a_warning(minilm_run, tmp_path, caplog):
    run = Path(shutil.copytree(minilm_run, tmp_path / "run"))
    _, torch_hits = _search(run, "torch")
    _search(run, "ort-fp32")
    (cached,) = (run / "cache" / "onnx").glob("encoder-*-ort-fp32.onnx")
    cached.write_bytes(cached.read_bytes()[:1000])                  # cut short, as by a crash or a full disk
    with caplog.at_level("WARNING"):
        _, hits = _search(run, "ort-fp32")
    assert "does not load" in caplog.text and "exporting it again" in caplog.text
    assert [[i for i, _ in row] for row in hits] == [[i for i, _ in row] for row in torch_hits]
    assert cached.stat().st_size > 100_000


def test_bad_engine_choices_name_the_problem(minilm_run, run):
    with pytest.raises(RetrieverError, match="trained from scratch"):
        Retriever.from_run(run, device="cpu", encoder_engine="ort-fp32")    # conftest's run: no BERT encoder
    with pytest.raises(RetrieverError, match="unknown encoder engine 'tensorrt'"):
        Retriever.from_run(minilm_run, device="cpu", fallback=False, encoder_engine="tensorrt")


def test_serve_cli_takes_the_engine(minilm_run, tmp_path, capsys):
    import serve

    from ace.model.onnx_encoder import SERVING_ENGINES

    for engine in SERVING_ENGINES:      # serve.py's choices are the engines the Retriever knows
        assert serve.parse_args(["--run", str(minilm_run), "--encoder-engine", engine]).encoder_engine == engine
    args = serve.parse_args(["--run", str(minilm_run), "--encoder-engine", "ort-int8"])
    assert args.encoder_engine == "ort-int8"
    assert serve.parse_args(["--run", str(minilm_run)]).encoder_engine == "torch"
    with pytest.raises(SystemExit):
        serve.parse_args(["--run", str(minilm_run), "--encoder-engine", "gpu-magic"])
    assert "invalid choice" in capsys.readouterr().err
    assert json.loads((minilm_run / "model" / "config.json").read_text())["pretrained_encoder"]
