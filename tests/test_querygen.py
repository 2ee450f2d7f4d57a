"""Query generation: backends on tiny random models built offline, runner cache/resume, dedup, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ace.config import ConfigError, load_config
from ace.data.corpus import CorpusItem
from querygen import QueryGenConfig, QueryGenError, build_backend, run_querygen
from querygen.__main__ import main as cli_main
from querygen.base import GeneratedQuery
from querygen.captions import CaptionsBackend
from querygen.corpus_file import read_corpus
from querygen.filters import NearDuplicateFilter, clean_query, degenerate_reason
from querygen.media import MediaError, load_audio, load_image, sample_video_frames
from querygen.mllm import MLLMBackend
from querygen.paraphrase import ParaphraseBackend
from querygen.runner import filter_queries
from querygen.template import TemplateBackend

WORDS = ("a the of in on with and is are dog cat man woman child car bird water wind rain music street "
         "red blue green small large photo image sound video plays runs sits walks talks barks sings "
         "describe objects scene style people doing write short search query caption rewrite").split()
CHAT = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def word_tokenizer():
    """A word-level tokenizer built offline: every generated token decodes to a real word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["user:", "assistant:", "system:"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = CHAT
    return tok


def llama_text_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       **kw)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    """A randomly initialised tiny LLaVA (CLIP vision tower + Llama) with processor, saved to a folder."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = word_tokenizer()
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=16,
                                                     intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, projection_dim=16),
                      text_config=llama_text_config(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llava")
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """A randomly initialised tiny Llama causal LM + chat tokenizer, saved to a folder."""
    from transformers import LlamaForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(llama_text_config(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """Real photographs from skimage.data as PNG, a corrupt PNG, a short video (PyAV) and a WAV tone."""
    import av
    from PIL import Image
    from scipy.io import wavfile
    from skimage import data

    d = tmp_path_factory.mktemp("media")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    frames = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64)))
    with av.open(str(d / "clip.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.roll(frames, 4 * i, axis=1).copy(), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    t = np.arange(22050) / 22050
    wavfile.write(d / "tone.wav", 22050, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    (d / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    return d


def relaxed(**kw) -> QueryGenConfig:
    """Random tiny models emit random words: keep the filters from judging them, test the plumbing."""
    base = dict(min_words=1, max_token_run=1000, min_unique_ratio=0.0, dedup_threshold=1.0, max_new_tokens=6)
    return QueryGenConfig(**{**base, **kw})


# ---- mllm ----------------------------------------------------------------------------------------------------
def test_mllm_tiny_llava_generates_per_perspective_on_real_images(tiny_vlm, media_dir, tmp_path):
    items = [CorpusItem(n, "image", media=f"{n}.png") for n in ("astronaut", "coffee", "chelsea")]
    cfg = relaxed(backend="mllm", model=tiny_vlm, num_queries=3, batch_size=4, media_root=str(media_dir))
    backend = build_backend(cfg)
    queries = backend.generate(items)
    assert backend.pop_failures() == []
    assert len(queries) == 9 and backend.stats.sequences == 9
    assert [q.source for q in queries if q.item_id == "coffee"] == ["mllm/0", "mllm/1", "mllm/2"]
    assert all(q.prompt and q.query.strip() for q in queries)
    vocab = set(WORDS) | {"user:", "assistant:", "system:"}
    assert all(set(q.query.split()) <= vocab for q in queries), queries  # decoded words, no ids / special tokens
    assert 0 < backend.stats.generated_tokens <= 9 * 6
    # batch of 4 rows padded on the left gives the same greedy output as the item alone (batching is sound)
    alone = MLLMBackend(model=tiny_vlm, num_queries=3, max_new_tokens=6, batch_size=1, media_root=media_dir)
    assert [q.query for q in alone.generate(items[1:2])] == [q.query for q in queries if q.item_id == "coffee"]

    summary = run_querygen(items, backend, config=cfg, out_dir=tmp_path / "out")
    from datasets import load_from_disk
    ds = load_from_disk(summary.dataset_path)
    assert ds.column_names == ["item_id", "query", "source"]
    assert summary.raw_queries == 9 and len(ds) + sum(summary.dropped.values()) == 9
    assert set(ds["item_id"]) <= {"astronaut", "coffee", "chelsea"}


def test_mllm_video_frames_and_bad_media_are_skipped(tiny_vlm, media_dir, tmp_path):
    items = [CorpusItem("vid", "video", media="clip.mp4"),
             CorpusItem("gone", "image", media="nope.png"),
             CorpusItem("broken", "image", media="broken.png"),
             CorpusItem("txt", "text", captions=["a caption"]),
             CorpusItem("cat", "image", media=str(media_dir / "chelsea.png"))]  # absolute path
    cfg = relaxed(backend="mllm", model=tiny_vlm, num_queries=2, video_frames=3, batch_size=5,
                  media_root=str(media_dir))
    summary = run_querygen(items, build_backend(cfg), config=cfg, out_dir=tmp_path)
    reasons = {f["item_id"]: f["reason"] for f in summary.failures}
    assert set(reasons) == {"gone", "broken", "txt"}
    assert "not found" in reasons["gone"] and "nope.png" in reasons["gone"]
    assert "unreadable image" in reasons["broken"]
    assert "modality 'text'" in reasons["txt"]
    assert summary.items_generated == 2 and summary.items_failed == 3
    logged = [json.loads(ln) for ln in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert {r["item_id"] for r in logged} == {"gone", "broken", "txt"}
    frames = sample_video_frames(media_dir / "clip.mp4", 3)
    assert len(frames) == 3 and frames[0].size == (64, 64)


AUDIO_CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'audio' %}"
              "<|audio_bos|><|AUDIO|><|audio_eos|> {% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_audio_lm(tmp_path_factory) -> str:
    """A randomly initialised tiny Qwen2-Audio (Whisper-style encoder + Qwen2) with its processor."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, Qwen2Config, WhisperFeatureExtractor)

    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]})
    tok.chat_template = AUDIO_CHAT
    fe = WhisperFeatureExtractor(feature_size=16, sampling_rate=16000, chunk_length=2, n_fft=400, hop_length=160)
    proc = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=AUDIO_CHAT)
    text = {k: v for k, v in llama_text_config(tok).to_dict().items()
            if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")}
    cfg = Qwen2AudioConfig(audio_config=Qwen2AudioEncoderConfig(num_mel_bins=16, encoder_layers=1, d_model=16,
                                                                encoder_attention_heads=2, encoder_ffn_dim=32,
                                                                max_source_positions=100),
                           text_config=Qwen2Config(**text), audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_qwen2_audio")
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return str(folder)


def test_mllm_tiny_qwen2_audio_on_wav(tiny_audio_lm, media_dir):
    items = [CorpusItem("tone", "audio", media="tone.wav"), CorpusItem("bad", "audio", media="broken.wav"),
             CorpusItem("tone2", "audio", media=str(media_dir / "tone.wav"))]
    backend = MLLMBackend(model=tiny_audio_lm, num_queries=2, max_new_tokens=5, media_root=media_dir)
    queries = backend.generate(items)
    assert [(f.item_id, "unreadable audio" in f.reason) for f in backend.pop_failures()] == [("bad", True)]
    assert [(q.item_id, q.source) for q in queries] == [("tone", "mllm/0"), ("tone", "mllm/1"),
                                                        ("tone2", "mllm/0"), ("tone2", "mllm/1")]
    assert all(q.query.strip() and "AUDIO" not in q.query for q in queries)
    assert [q.query for q in queries[:2]] == [q.query for q in queries[2:]]  # same audio, greedy: same output


def test_mllm_unknown_model_path_is_a_clear_error(tmp_path, media_dir):
    backend = MLLMBackend(model=str(tmp_path / "no_such_model"), media_root=media_dir)
    with pytest.raises(QueryGenError, match="cannot load mllm model .*no_such_model.*not a local folder"):
        backend.generate([CorpusItem("a", "image", media="coffee.png")])
    with pytest.raises(QueryGenError, match="needs model="):
        MLLMBackend(model=None)


def test_every_item_failing_stops_with_a_clear_message(tiny_vlm, media_dir, tmp_path):
    items = [CorpusItem(f"m{i}", "image", media=f"missing{i}.png") for i in range(5)]
    cfg = relaxed(backend="mllm", model=tiny_vlm, batch_size=2, media_root=str(media_dir))
    with pytest.raises(QueryGenError, match="every item failed.*media file not found"):
        run_querygen(items, build_backend(cfg), config=cfg, out_dir=tmp_path / "a")
    cfg = relaxed(backend="mllm", model=tiny_vlm, batch_size=2, abort_after_failures=2, media_root=str(media_dir))
    backend = build_backend(cfg)
    with pytest.raises(QueryGenError, match="first 2 items all failed"):
        run_querygen(items, backend, config=cfg, out_dir=tmp_path / "b")
    assert backend.stats.model_calls == 1  # stopped after the first batch, not after all 5 items


def test_media_readers(media_dir):
    assert load_image(media_dir / "coffee.png").mode == "RGB"
    wave = load_audio(media_dir / "tone.wav", 16000)
    assert wave.dtype == np.float32 and abs(len(wave) - 16000) < 400  # 1 s resampled 22.05 kHz -> 16 kHz
    with pytest.raises(MediaError, match="unreadable audio .*broken.wav"):
        load_audio(media_dir / "broken.wav", 16000)
    with pytest.raises(MediaError, match="unreadable image"):
        load_image(media_dir / "broken.png")
    with pytest.raises(MediaError, match="not found"):
        sample_video_frames(media_dir / "nope.mp4", 2)


# ---- paraphrase ----------------------------------------------------------------------------------------------
def test_paraphrase_tiny_lm_samples_n_rewrites_per_caption(tiny_lm):
    items = [CorpusItem("a", "audio", captions=["a dog barks on the street"]),
             CorpusItem("b", "image", captions=["a man walks with a red car", "second caption"]),
             CorpusItem("c", "audio", captions=[])]
    backend = ParaphraseBackend(model=tiny_lm, num_queries=3, max_new_tokens=8, caption_indices=[0])
    queries = backend.generate(items)
    assert [f.item_id for f in backend.pop_failures()] == ["c"]
    assert len(queries) == 6 and backend.stats.sequences == 6
    assert [q.source for q in queries if q.item_id == "a"] == ["paraphrase/0", "paraphrase/1", "paraphrase/2"]
    assert all("dog" not in q.prompt for q in queries)  # the echo reference is the instruction, not the caption
    assert len({q.query for q in queries}) > 1  # sampling
    assert backend.stats.generated_tokens > 0
    # the chat template with few-shot turns and the caption reaches the model
    text = backend._chat(backend.jobs(items[0])[0][2], 0, "audio")
    assert "a dog barks on the street" in text and text.count("user:") == 2 and text.endswith("assistant:")
    with pytest.raises(QueryGenError, match=r"must contain '\{caption\}'"):
        ParaphraseBackend(model=tiny_lm, prompts=["no placeholder"])
    with pytest.raises(QueryGenError, match="cannot load paraphrase model"):
        ParaphraseBackend(model="/nonexistent/model").generate(items[:1])


class FlakyParaphrase(ParaphraseBackend):
    """Counts generate() calls and items; raises on call number ``fail_on`` (a simulated kill)."""

    def __init__(self, *, fail_on: int | None = None, **kw):
        super().__init__(**kw)
        self.fail_on, self.seen = fail_on, []

    def generate(self, items):
        if self.fail_on is not None and self.stats.model_calls + 1 == self.fail_on:
            raise KeyboardInterrupt("killed")
        self.seen.extend(it.item_id for it in items)
        return super().generate(items)


def test_resume_after_interruption_does_not_regenerate_finished_items(tiny_lm, tmp_path):
    items = [CorpusItem(f"i{k}", "audio", captions=[f"a {w} sound with water"]) for k, w in
             enumerate(["dog", "cat", "bird", "car", "rain", "wind", "music"])]
    cfg = relaxed(backend="paraphrase", model=tiny_lm, num_queries=2, batch_size=2, max_new_tokens=5)
    first = FlakyParaphrase(fail_on=3, model=tiny_lm, num_queries=2, max_new_tokens=5)
    with pytest.raises(KeyboardInterrupt):
        run_querygen(items, first, config=cfg, out_dir=tmp_path)
    assert first.seen == ["i0", "i1", "i2", "i3"]
    cache = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert [json.loads(ln)["item_id"] for ln in cache] == ["i0", "i1", "i2", "i3"]
    with open(tmp_path / "cache.jsonl", "a") as fh:
        fh.write('{"item_id": "i4", "backend": "paraphr')  # torn line from a kill mid-write
    second = FlakyParaphrase(model=tiny_lm, num_queries=2, max_new_tokens=5)
    summary = run_querygen(items, second, config=cfg, out_dir=tmp_path)
    assert second.seen == ["i4", "i5", "i6"] and second.stats.model_calls == 2
    assert summary.items_from_cache == 4 and summary.items_generated == 3 and summary.raw_queries == 14
    # a finished run reruns from the cache alone; a changed prompt set is a different cache key
    third = FlakyParaphrase(model=tiny_lm, num_queries=2, max_new_tokens=5)
    assert run_querygen(items, third, config=cfg, out_dir=tmp_path).items_from_cache == 7 and third.seen == []
    other = FlakyParaphrase(model=tiny_lm, num_queries=2, max_new_tokens=5, prompts=["say {caption}"])
    run_querygen(items[:1], other, config=cfg, out_dir=tmp_path)
    assert other.seen == ["i0"]
    # an item whose captions changed since its entry was written is generated again; the others come from the cache
    edited = [CorpusItem("i1", "audio", captions=["a lion roars"])] + items[2:4]
    fourth = FlakyParaphrase(model=tiny_lm, num_queries=2, max_new_tokens=5)
    assert run_querygen(edited, fourth, config=cfg, out_dir=tmp_path).items_from_cache == 2 and fourth.seen == ["i1"]


# ---- filtering and dedup -------------------------------------------------------------------------------------
def test_exact_and_near_duplicates_are_removed_per_item():
    raw = {"x": [GeneratedQuery("x", q, "s") for q in [
        "A dog barks at night.", "a dog  BARKS at night", "\"A dog barks at night!\"",  # exact after normalise
        "A dog barks loudly at night", "A dog barks loudly at nigh",                     # near duplicate
        "cars passing on a wet road"]],
        "y": [GeneratedQuery("y", "A dog barks at night.", "s")]}                        # other item: kept
    items = [CorpusItem("x", "audio"), CorpusItem("y", "audio")]
    kept, dropped = filter_queries(items, raw, config=QueryGenConfig(dedup_threshold=0.8))
    assert [q.query for q in kept if q.item_id == "x"] == ["A dog barks at night.", "A dog barks loudly at night",
                                                           "cars passing on a wet road"]
    assert dropped == {"exact_duplicate": 2, "near_duplicate": 1} and kept[-1].item_id == "y"
    kept, dropped = filter_queries(items, raw, config=QueryGenConfig(dedup_threshold=1.0))
    assert dropped == {"exact_duplicate": 2} and len(kept) == 5
    tok = NearDuplicateFilter(method="token_jaccard", threshold=0.6)
    assert tok.check("dog barks at night") is None
    assert tok.check("at night dog barks loudly") == "near_duplicate"
    assert tok.check("rain on a roof") is None


def test_degenerate_generations_are_named():
    assert degenerate_reason("") == "empty" and degenerate_reason("?!") == "empty"
    assert degenerate_reason("dog") == "too_short"
    assert degenerate_reason("search query", prompt="Write a short search query for it:") == "prompt_echo"
    assert degenerate_reason("a dog barking", prompt="Write a short search query for it:") is None
    assert degenerate_reason("dog dog dog barks") == "repeated_tokens"
    assert degenerate_reason("a b a b a b a b") == "repeated_tokens"
    assert degenerate_reason("Here's a rephrased version") == "preamble"
    assert degenerate_reason("The audio description is:") == "preamble"
    assert clean_query('  1. "Dog barking  near cars"  ') == "Dog barking near cars"
    assert clean_query("Query: rain on a roof") == "rain on a roof"


# ---- captions / template backends, corpus files, config, CLI ---------------------------------------------------
def test_captions_backend_indices_and_missing_captions():
    items = [CorpusItem("a", "image", captions=["c0", "c1", "c2"]), CorpusItem("b", "image", captions=["only"])]
    b = CaptionsBackend(caption_indices=[1, 2])
    assert [(q.item_id, q.query, q.source) for q in b.generate(items)] == [("a", "c1", "caption/1"),
                                                                         ("a", "c2", "caption/2")]
    assert [(f.item_id, "indices [1, 2]" in f.reason) for f in b.pop_failures()] == [("b", True)]
    assert [q.query for q in CaptionsBackend(caption_indices=[-1]).generate(items)] == ["c2", "only"]
    assert len(CaptionsBackend().generate(items)) == 4


def test_template_backend_uses_metadata_fields():
    items = [CorpusItem("a", "audio", metadata={"label": "dog bark", "tags": ["dog", "outdoor", "night"]}),
             CorpusItem("b", "image", metadata={"tags": "beach|sunset"}),
             CorpusItem("c", "image", metadata={"width": None})]
    b = TemplateBackend(num_queries=4, seed=1)
    out = b.generate(items)
    a = [q.query for q in out if q.item_id == "a"]
    assert len(a) == 4 and len(set(a)) == 4 and all(q.source.startswith("template/") for q in out)
    assert any("dog bark" in q for q in a)
    assert {q.item_id for q in out} == {"a", "b"}
    assert [f.item_id for f in b.pop_failures()] == ["c"]
    assert [q.query for q in TemplateBackend(num_queries=4, seed=1).generate(items[:1])] == a  # deterministic


def test_read_corpus_files_and_errors(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"item_id": "a", "modality": "image", "media": "a.png", "captions": ["x y", "z w"]}) + "\n" +
        json.dumps({"item_id": "b", "modality": "audio", "media": "b.wav", "captions": ["one"],
                    "metadata": {"tags": ["t"]}}) + "\n")
    items, root = read_corpus(tmp_path / "c.jsonl")  # media need not exist: the mllm backend skips per item
    assert [(i.item_id, i.captions) for i in items] == [("a", ["x y", "z w"]), ("b", ["one"])]
    assert items[1].metadata == {"tags": ["t"]} and root == tmp_path
    assert len(read_corpus(tmp_path / "c.jsonl", limit=1)[0]) == 1
    (tmp_path / "bad.jsonl").write_text('{"modality": "image"}\n')
    with pytest.raises(QueryGenError, match="item_id"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(QueryGenError, match="not found"):
        read_corpus(tmp_path / "none.jsonl")


def test_audiocaps_caption_file_reads_as_corpus(shared_data):
    items, _ = read_corpus(shared_data / "audiocaps" / "train.csv", limit=5)
    assert len(items) == 5 and all(i.modality == "audio" and len(i.captions) == 1 for i in items)


def test_config_from_yaml_and_overrides(tmp_path):
    (tmp_path / "q.yaml").write_text("backend: paraphrase\nnum_queries: 3\ncaption_indices: [1, 2]\n")
    cfg = load_config(QueryGenConfig, tmp_path / "q.yaml", ["dedup_threshold=0.9", "batch_size=16"])
    assert (cfg.backend, cfg.num_queries, cfg.caption_indices, cfg.dedup_threshold, cfg.batch_size) == \
        ("paraphrase", 3, [1, 2], 0.9, 16)
    for name in ("querygen_paraphrase.yaml", "querygen_mllm.yaml"):  # the shipped configs stay loadable
        assert load_config(QueryGenConfig, Path(__file__).parents[1] / "configs" / name).num_queries == 4
    with pytest.raises(ConfigError, match="unknown backend 'gpt'"):
        load_config(QueryGenConfig, None, ["backend=gpt"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(QueryGenConfig, None, ["num_querys=3"])
    with pytest.raises(ConfigError, match="num_threads must be >= 1"):
        load_config(QueryGenConfig, None, ["num_threads=0"])
    from querygen.lm import model_dtype
    assert model_dtype("auto", "cpu") == torch.float32 and model_dtype("auto", "cuda") == "auto"
    assert model_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(QueryGenError, match="dtype must be"):
        model_dtype("int8", "cpu")


def test_time_budget_stops_cleanly_and_a_rerun_continues(tmp_path):
    items = [CorpusItem(f"i{k}", "image", captions=[f"caption number {k} here"]) for k in range(5)]
    cfg = QueryGenConfig(backend="captions", batch_size=2, max_seconds=0.0)
    first = run_querygen(items, build_backend(cfg), config=cfg, out_dir=tmp_path)
    assert (first.items_generated, first.items_pending, first.queries) == (2, 3, 2)
    assert "3 pending: time budget used" in first.format()
    cfg = QueryGenConfig(backend="captions", batch_size=2)
    second = run_querygen(items, build_backend(cfg), config=cfg, out_dir=tmp_path)
    assert (second.items_from_cache, second.items_generated, second.items_pending, second.queries) == (2, 3, 0, 5)


def test_cli_captions_to_jsonl_dataset(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"item_id": f"i{k}", "modality": "image",
                                          "captions": [f"photo number {k} of a dog", f"photo number {k} of a dog!",
                                                       f"a cat sitting on mat {k}"]}) + "\n" for k in range(3)))
    rc = cli_main(["--corpus", str(corpus), "--backend", "captions", "--out", str(tmp_path / "out"),
                   "output_format=jsonl"])
    assert rc == 0
    rows = [json.loads(ln) for ln in (tmp_path / "out" / "queries.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"item_id", "query", "source"}
    out = capsys.readouterr().out
    assert "6 queries for 3/3 items" in out and "exact_duplicate 3" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]["queries"] == 6
    assert cli_main(["--corpus", str(corpus), "--out", str(tmp_path / "o2"), "batch_size=0"]) == 2
    assert "batch_size must be >= 1" in capsys.readouterr().err
