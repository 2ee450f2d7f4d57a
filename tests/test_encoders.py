import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from ace.config import ConfigError, load_config
from ace.data.corpus import Corpus, CorpusItem
from ace.data.encoders import (EncoderConfig, EncoderError, ItemEncoder, ModalityProjection, MultiModalEncoder,
                          MultiModalEncoderConfig, build_encoder, load_precomputed, minilm_path)

# ---- real media made or shipped offline ------------------------------------------------------------


def write_wav(path: Path, y: np.ndarray, sr: int = 16000) -> Path:
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sr)
        fh.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def tone(hz: float, seconds: float = 1.0, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return 0.8 * np.sin(2 * np.pi * hz * t)


def write_moving_square(path: Path, direction: str, size: int = 64, frames: int = 8) -> Path:
    """A white square crossing a dark frame left->right or right->left, written with PyAV."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for f in range(frames):
            x = int(4 + (size - 20) * f / (frames - 1))
            if direction == "left":
                x = size - 16 - x
            arr = np.full((size, size, 3), 20, np.uint8)
            arr[size // 2 - 8: size // 2 + 8, x: x + 16] = 240
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}.png")
    write_moving_square(root / "right.mp4", "right")
    write_moving_square(root / "left.mp4", "left")
    write_wav(root / "low.wav", tone(220))
    write_wav(root / "high.wav", tone(1800))
    write_wav(root / "noise.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 16000))
    (root / "broken.png").write_bytes(b"not an image")
    (root / "broken.wav").write_bytes(b"RIFF....WAVEnope")
    (root / "broken.mp4").write_bytes(b"\x00" * 64)
    return root


IMAGES = [CorpusItem(n, "image", f"{n}.png") for n in ("astronaut", "coffee", "chelsea")]
VIDEOS = [CorpusItem("right", "video", "right.mp4"), CorpusItem("left", "video", "left.mp4")]
SOUNDS = [CorpusItem(n, "audio", f"{n}.wav") for n in ("low", "high", "noise")]


def assert_normalised(x: np.ndarray, n: int, d: int) -> None:
    assert x.dtype == np.float32 and x.shape == (n, d)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ---- tiny CLIP / CLAP built from configs, loaded through from_pretrained -----------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


TEXT_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tokenizer) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    cfg = CLIPConfig(text_config=dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.cls_token_id,
                                      eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                                      **TEXT_TOWER),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory, tokenizer) -> str:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clap")
    audio = dict(spec_size=64, num_mel_bins=16, window_size=4, patch_size=2, patch_stride=2, hidden_size=32,
                 patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], intermediate_size=37,
                 projection_dim=16)
    cfg = ClapConfig(text_config=dict(vocab_size=tokenizer.vocab_size, **TEXT_TOWER), audio_config=audio,
                     projection_dim=16)
    ClapModel(cfg).save_pretrained(folder)
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=320, max_length_s=2,
                              fft_window_size=512, truncation="rand_trunc")
    ClapProcessor(feature_extractor=fe, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_hf_clip_images_video_text(tiny_clip, media):
    enc = build_encoder(EncoderConfig(kind="hf", name_or_path=tiny_clip, frames_per_video=4))
    assert set(enc.modalities) == {"image", "video", "text"} and enc.dim == 16
    items = IMAGES + VIDEOS + [CorpusItem("t", "text", captions=["a cat on a sofa"])]
    x = enc.encode(items, root=media)
    assert_normalised(x, 6, 16)
    np.testing.assert_allclose(enc.encode(IMAGES[:1], root=media), x[:1], atol=1e-5)  # batch-independent
    assert not np.allclose(x[0], x[1])
    texts = enc.encode_texts(["a cat on a sofa", "a rocket"])
    assert_normalised(texts, 2, 16)
    np.testing.assert_allclose(texts[0], x[5], atol=1e-5)  # a text item = its text through the text tower
    with pytest.raises(EncoderError, match="encodes image, video, text; items of another modality: \\['low'\\]"):
        enc.encode(SOUNDS[:1], root=media)


def test_hf_clap_audio(tiny_clap, media):
    enc = build_encoder(EncoderConfig(kind="hf", name_or_path=tiny_clap))
    assert set(enc.modalities) == {"audio", "text"}
    x = enc.encode(SOUNDS, root=media)
    assert_normalised(x, 3, 16)
    assert_normalised(enc.encode_texts(["a dog barks"]), 1, 16)


def test_hf_clap_on_clotho(tiny_clap, shared_data):
    wavs = sorted((shared_data / "clotho" / "audio").glob("*.wav"))[:3]
    if not wavs:
        pytest.skip("no Clotho WAVs in ../shared/data/clotho/audio")
    enc = build_encoder(EncoderConfig(kind="hf", name_or_path=tiny_clap, audio_seconds=2.0))
    assert_normalised(enc.encode([CorpusItem(w.stem, "audio", str(w)) for w in wavs]), len(wavs), 16)


def test_hf_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="cannot load Hugging Face dual encoder"):
        build_encoder(EncoderConfig(kind="hf", name_or_path=str(tmp_path / "nothing-here")))
    with pytest.raises(EncoderError, match="needs name_or_path"):
        build_encoder(EncoderConfig(kind="hf"))


# ---- cache --------------------------------------------------------------------------------------------


def test_cache_skips_encoded_items(tiny_clip, media, tmp_path, monkeypatch):
    cfg = EncoderConfig(kind="hf", name_or_path=tiny_clip, cache_dir=str(tmp_path / "cache"), batch_size=2)
    first = build_encoder(cfg)
    x = first.encode(IMAGES, root=media)
    assert first.calls == 2  # 3 items, batch 2

    again = build_encoder(cfg)  # a new process would see the same folder

    def boom(*a, **k):
        raise AssertionError("the model was called although every item is cached")

    monkeypatch.setattr(again, "_encode_batch", boom)
    np.testing.assert_array_equal(again.encode(IMAGES, root=media), x)

    # a changed media file (size / mtime) is re-encoded, the others come from the cache
    monkeypatch.undo()
    changed = media / "changed.png"
    changed.write_bytes((media / "coffee.png").read_bytes())
    items = IMAGES + [CorpusItem("coffee2", "image", "changed.png")]
    third = build_encoder(cfg)
    y = third.encode(items, root=media)
    assert third.calls == 1
    np.testing.assert_allclose(y[3], x[1], atol=1e-5)

    # captions are not part of a media encoder's key: editing them keeps the cache
    fourth = build_encoder(cfg)
    recaptioned = [CorpusItem(it.item_id, "image", it.media, captions=["a new caption"]) for it in IMAGES]
    np.testing.assert_array_equal(fourth.encode(recaptioned, root=media), x)
    assert fourth.calls == 0

    # a config change that alters embeddings uses another cache folder
    other = build_encoder(EncoderConfig(**{**cfg.__dict__, "frames_per_video": 3}))
    other.encode(IMAGES[:1], root=media)
    assert other.calls == 1
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_corrupt_cache_shard_is_named(tmp_path):
    cfg = EncoderConfig(kind="precomputed", cache_dir=str(tmp_path))
    from ace.data.encoders import EmbeddingCache

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "shard-bad.npz").write_bytes(b"garbage")
    with pytest.raises(EncoderError, match="corrupt embedding cache shard .*shard-bad.npz"):
        EmbeddingCache(tmp_path / "x")
    assert build_encoder(cfg).cache is None  # precomputed embeddings are not cached


# ---- offline defaults on real media ----------------------------------------------------------------------


def test_efficientnet_images_and_video_motion(media):
    enc = build_encoder(EncoderConfig(kind="efficientnet", image_size=64, spatial_grid=2, frames_per_video=4,
                                      video_pooling="mean+motion"))
    assert enc.dim == 2 * 4 * 1280
    x = enc.encode(IMAGES + VIDEOS, root=media)
    assert_normalised(x, 5, enc.dim)
    assert np.all(x[:3, 5120:] == 0)  # an image is a still video: no motion half
    motion = x[3:, 5120:]
    cos = motion[0] @ motion[1] / np.linalg.norm(motion[0]) / np.linalg.norm(motion[1])
    assert cos < -0.3, f"opposite motions should give opposite motion features, cos={cos:.2f}"
    plain = build_encoder(EncoderConfig(kind="efficientnet", image_size=64))
    y = plain.encode(IMAGES, root=media)
    assert_normalised(y, 3, 1280)
    np.testing.assert_allclose(plain.encode(IMAGES[2:], root=media), y[2:], atol=1e-5)


def test_aisfx_audio(media):
    enc = build_encoder(EncoderConfig(kind="aisfx"))
    x = enc.encode(SOUNDS, root=media)
    assert_normalised(x, 3, 512)
    sim = x @ x.T
    assert sim[0, 1] < 0.999 and sim[0, 2] < 0.999  # low tone, high tone and noise differ
    assert enc.blocks(np.zeros((30, 96), np.float32)).shape == (1, 100, 96)  # short clip: one padded block
    assert enc.blocks(np.zeros((260, 96), np.float32)).shape == (4, 100, 96)


def test_aisfx_on_clotho(shared_data):
    wavs = sorted((shared_data / "clotho" / "audio").glob("*.wav"))[:2]
    if not wavs:
        pytest.skip("no Clotho WAVs in ../shared/data/clotho/audio")
    enc = build_encoder(EncoderConfig(kind="aisfx", audio_seconds=3.0))
    assert_normalised(enc.encode([CorpusItem(w.stem, "audio", str(w)) for w in wavs]), len(wavs), 512)


@pytest.mark.parametrize("kind,item,pattern", [
    ("efficientnet", CorpusItem("bad-img", "image", "broken.png"), r"cannot read image of item 'bad-img'"),
    ("efficientnet", CorpusItem("gone", "image", "missing.png"), r"cannot read image of item 'gone'"),
    ("efficientnet", CorpusItem("bad-vid", "video", "broken.mp4"), r"cannot decode video of item 'bad-vid'"),
    ("efficientnet", CorpusItem("no-media", "image"), r"item 'no-media' \(image\) has no media file"),
    ("aisfx", CorpusItem("bad-wav", "audio", "broken.wav"), r"cannot read audio of item 'bad-wav'"),
    ("aisfx", CorpusItem("img", "image", "coffee.png"), r"encodes audio; items of another modality: \['img'\]"),
])
def test_bad_media_names_the_item(media, kind, item, pattern):
    with pytest.raises(EncoderError, match=pattern):
        build_encoder(EncoderConfig(kind=kind, image_size=64)).encode([item], root=media)


# ---- precomputed ------------------------------------------------------------------------------------------


def test_precomputed_formats_align_by_id(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c"]
    emb = rng.normal(size=(3, 5)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    (tmp_path / "e.ids.txt").write_text("\n".join(ids))
    np.savez(tmp_path / "e.npz", ids=np.array(ids), embeddings=emb)
    torch.save({"ids": ids, "embeddings": torch.from_numpy(emb)}, tmp_path / "e.pt")
    torch.save({i: torch.from_numpy(e) for i, e in zip(ids, emb)}, tmp_path / "d.pt")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": ids, "vec": emb.tolist()}), tmp_path / "e.parquet")
    items = [CorpusItem("c", "image"), CorpusItem("a", "audio")]  # another order, mixed modalities
    want = emb[[2, 0]] / np.linalg.norm(emb[[2, 0]], axis=1, keepdims=True)
    for name in ("e.npy", "e.npz", "e.pt", "d.pt", "e.parquet"):
        enc = build_encoder(EncoderConfig(kind="precomputed", name_or_path=str(tmp_path / name), column="vec"))
        np.testing.assert_allclose(enc.encode(items), want, atol=1e-6, err_msg=name)
    enc = build_encoder(EncoderConfig(kind="precomputed", name_or_path=str(tmp_path / "e.npz")))
    with pytest.raises(EncoderError, match=r"1 item id\(s\) not found in .*: \['zz'\]"):
        enc.encode([CorpusItem("zz", "image")])


def test_precomputed_bad_files(tmp_path):
    emb = np.ones((3, 4), np.float32)
    np.save(tmp_path / "x.npy", emb)
    with pytest.raises(EncoderError, match="needs its item ids"):
        load_precomputed(tmp_path / "x.npy")
    (tmp_path / "x.ids.txt").write_text("a\nb\n")
    with pytest.raises(EncoderError, match="2 item ids for 3 embedding rows"):
        load_precomputed(tmp_path / "x.npy")
    (tmp_path / "x.ids.txt").write_text("a\nb\na\n")
    with pytest.raises(EncoderError, match=r"duplicate item ids at rows \[2\]"):
        load_precomputed(tmp_path / "x.npy")
    emb[1, 2] = np.nan
    np.savez(tmp_path / "n.npz", ids=np.array(["a", "b", "c"]), embeddings=emb)
    with pytest.raises(EncoderError, match=r"NaN or infinite values in rows \[1\] \(item ids \['b'\]\)"):
        load_precomputed(tmp_path / "n.npz")
    np.savez(tmp_path / "w.npz", ids=np.array(["a"]), embeddings=np.ones(4))
    with pytest.raises(EncoderError, match=r"non-empty \(N, D\) array"):
        load_precomputed(tmp_path / "w.npz")
    with pytest.raises(EncoderError, match="not found"):
        load_precomputed(tmp_path / "absent.npy")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(EncoderError, match="must be .npy, .npz, .pt or .parquet"):
        load_precomputed(tmp_path / "x.csv")


def test_precomputed_inline_embeddings():
    enc = build_encoder(EncoderConfig(kind="precomputed"))
    items = [CorpusItem("a", "image", embedding=np.array([3.0, 4.0])), CorpusItem("b", "text", embedding=np.array([0.0, 2.0]))]
    np.testing.assert_allclose(enc.encode(items), [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)
    with pytest.raises(EncoderError, match=r"items without an 'embedding'.*\['c'\]"):
        enc.encode([CorpusItem("c", "image", "x.png")])
    with pytest.raises(EncoderError, match=r"mixed embedding dimensions \[2, 3\]"):
        enc.encode(items + [CorpusItem("d", "image", embedding=np.ones(3))])
    with pytest.raises(EncoderError, match="zero or non-finite embeddings for rows \\[0\\]"):
        enc.encode([CorpusItem("z", "image", embedding=np.zeros(2))])


# ---- sentence-transformers on descriptions -----------------------------------------------------------------


def test_sentence_encoder_describes_items(tmp_path):
    (tmp_path / "doc.txt").write_text("a long text document about boats")
    enc = build_encoder(EncoderConfig(kind="sentence-transformers", name_or_path="minilm",
                                      cache_dir=str(tmp_path / "cache")))
    items = [CorpusItem("i", "image", "x.png", captions=["a dog runs on the beach", "dog"]),
             CorpusItem("t", "text", "doc.txt"), CorpusItem("m", "audio", metadata={"text": "a dog runs on the beach"})]
    x = enc.encode(items, root=tmp_path)
    assert_normalised(x, 3, 384)
    np.testing.assert_allclose(x[0], x[2], atol=1e-5)  # caption 1 == metadata text
    np.testing.assert_allclose(x[1], enc.text_encoder.encode(["a long text document about boats"])[0], atol=1e-5)
    calls = enc.calls
    enc.encode(items, root=tmp_path)
    assert enc.calls == calls  # cached
    enc.encode([CorpusItem("i", "image", "x.png", captions=["a cat sleeps"])], root=tmp_path)
    assert enc.calls == calls + 1  # the text is this encoder's input: a new caption 1 is re-encoded
    with pytest.raises(EncoderError, match=r"no text to encode .*\['bare'\]"):
        enc.encode([CorpusItem("bare", "image", "x.png")], root=tmp_path)


# ---- routing and projection ------------------------------------------------------------------------------------


def test_multimodal_routes_and_projects():
    cfg = MultiModalEncoderConfig(image=EncoderConfig(kind="precomputed"), audio=EncoderConfig(kind="precomputed"),
                                  dim=6, seed=3)
    rng = np.random.default_rng(0)
    items = [CorpusItem(f"i{k}", "image", embedding=rng.normal(size=8)) for k in range(3)]
    items += [CorpusItem(f"a{k}", "audio", embedding=rng.normal(size=4)) for k in range(3)]
    order = [0, 3, 1, 4, 2, 5]
    items = [items[i] for i in order]  # interleaved modalities come back in item order
    enc = build_encoder(cfg)
    assert isinstance(enc, MultiModalEncoder)
    x = enc.encode(items)
    assert_normalised(x, 6, 6)
    np.testing.assert_array_equal(x, build_encoder(cfg).encode(items))  # the same seed gives the same map
    audio = [it for it in items if it.modality == "audio"]
    raw = np.stack([it.embedding / np.linalg.norm(it.embedding) for it in audio])
    proj = x[[1, 3, 5]]
    np.testing.assert_allclose(proj @ proj.T, raw @ raw.T, atol=1e-5)  # 4 -> 6: an isometry keeps cosines
    assert set(enc.encoders) == {"image", "audio"}  # video / text encoders are never built
    assert not np.allclose(x, build_encoder(MultiModalEncoderConfig(**{**cfg.__dict__, "seed": 4})).encode(items))

    padded = build_encoder(MultiModalEncoderConfig(**{**cfg.__dict__, "projection": "pad", "dim": 0})).encode(items)
    np.testing.assert_allclose(padded[1, :4], raw[0], atol=1e-6)
    np.testing.assert_array_equal(padded[1, 4:], 0)
    with pytest.raises(EncoderError, match="cannot shrink image embeddings from 8 to 6"):
        build_encoder(MultiModalEncoderConfig(**{**cfg.__dict__, "projection": "pad"})).encode(items)
    with pytest.raises(EncoderError, match="empty item list"):
        enc.encode([])
    with pytest.raises(EncoderError, match="unknown modality 'smell'"):
        enc.encode([CorpusItem("s", "smell", embedding=np.ones(3))])


def test_multimodal_wrong_kind_for_modality():
    enc = build_encoder(MultiModalEncoderConfig(image=EncoderConfig(kind="aisfx")))
    with pytest.raises(EncoderError, match="kind 'aisfx' configured for image cannot encode image"):
        enc.encode([CorpusItem("i", "image", "x.png")])


def test_multimodal_offline_defaults_on_a_corpus(media, tmp_path):
    corpus = Corpus(IMAGES[:1] + VIDEOS[:1] + SOUNDS[:1], root=media)
    cfg = load_config(MultiModalEncoderConfig, None, ["image.image_size=64", "video.image_size=64", "video.spatial_grid=1",
                                                      "video.frames_per_video=3", "dim=256",
                                                      f"cache_dir={tmp_path}"])
    enc = build_encoder(cfg)
    x = enc.encode_corpus(corpus)
    assert_normalised(x, 3, 256)
    assert {p.name.split("-")[0] for p in tmp_path.iterdir()} == {"efficientnet", "aisfx"}
    again = build_encoder(cfg)
    np.testing.assert_allclose(again.encode_corpus(corpus), x, atol=1e-6)
    assert sum(e.calls for e in again.encoders.values()) == 0


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown encoder kind 'clipp'"):
        load_config(MultiModalEncoderConfig, None, ["image.kind=clipp"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(MultiModalEncoderConfig, None, ["image.frames=3"])
    with pytest.raises(ConfigError, match="projection must be"):
        load_config(MultiModalEncoderConfig, None, ["projection=random"])
    with pytest.raises(TypeError, match="build_encoder takes"):
        build_encoder({"kind": "hf"})
    assert issubclass(type(build_encoder(EncoderConfig(kind="precomputed"))), ItemEncoder)
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            build_encoder(EncoderConfig(kind="efficientnet", device="cuda"))
    assert ModalityProjection(5, 5, kind="orthogonal", seed=0, modality="image").matrix is None
