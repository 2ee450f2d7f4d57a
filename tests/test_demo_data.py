import hashlib
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from ace.data.corpus import load_corpus
from ace.data.encoders import read_video_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import make_demo  # noqa: E402
from make_demo import COLOURS, DIRECTIONS, PITCH_LEVELS, PITCHES, SHAPES, SOUNDS, DemoConfig  # noqa: E402


def digest(folder: Path, pattern: str) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob(pattern)):
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    path = make_demo.make_demo(DemoConfig(out=str(out)))
    return path, time.time() - t0


def test_default_demo_corpus(full_demo):
    path, seconds = full_demo
    print(f"demo corpus generated in {seconds:.1f}s")  # a figure for BENCHMARKS.md, not an assertion
    corpus = load_corpus(path)  # validates: media exist, ids unique, captions non-empty
    cfg = DemoConfig()
    assert len(corpus) == cfg.images + cfg.sounds + cfg.videos
    assert {m: len(r) for m, r in corpus.by_modality().items()} == {"image": cfg.images, "audio": cfg.sounds,
                                                                     "video": cfg.videos}
    for it in corpus:
        assert len(set(it.captions)) == len(it.captions) >= 8, it.item_id
    # every item has a distinct attribute combination, so its captions can tell it apart
    for mod, rows in corpus.by_modality().items():
        combos = {tuple(sorted(corpus[i].metadata.items())) for i in rows}
        assert len(combos) == len(rows), mod
    # every attribute value of the sampled spaces is used
    images = [corpus[i] for i in corpus.by_modality()["image"]]
    assert {it.metadata["colour"] for it in images} == set(COLOURS)
    assert {it.metadata["shape"] for it in images} == set(SHAPES)


def template_captions(it, cfg=DemoConfig()):
    """The captions of the templates (without the everyday descriptions before the held-out ones)."""
    cut = len(it.captions) - cfg.held_out
    return it.captions[:cut - cfg.everyday] + it.captions[cut:]


def test_captions_name_the_attributes(full_demo):
    corpus = load_corpus(full_demo[0])
    for it in corpus:
        m = it.metadata
        for cap in template_captions(it):
            low = cap.lower()
            if it.modality in ("image", "video"):
                assert any(s.lower() in low for s in COLOURS[m["colour"]][1]), (it.item_id, cap)
                assert any(s.lower() in low for s in SHAPES[m["shape"]]), (it.item_id, cap)
            if it.modality == "video":
                assert any(s.lower() in low for s in DIRECTIONS[m["direction"]]), (it.item_id, cap)
            if it.modality == "audio":
                assert any(s.lower() in low for s in SOUNDS[m["sound"]]), (it.item_id, cap)
                assert any(s in low for s in PITCHES[m["pitch"]] + PITCH_LEVELS[m["pitch"]]), (it.item_id, cap)
    # held-out captions are paraphrases: the last caption of an item is never a copy of another item's
    last = [it.captions[-1] for it in corpus]
    assert len(set(last)) == len(last)


def test_everyday_descriptions(full_demo, tmp_path):
    """The everyday descriptions name the item's attributes in plain words, sit before the held-out
    captions, are never one of the newcomer evaluation queries, and change neither the media nor the
    template captions."""
    corpus = load_corpus(full_demo[0])
    cfg = DemoConfig()
    banned = make_demo.eval_queries()
    assert len(banned) >= 100  # both query sets were read
    for it in corpus:
        m = it.metadata
        assert len(it.captions) == cfg.captions + cfg.everyday, it.item_id
        extra = it.captions[cfg.captions - cfg.held_out:-cfg.held_out]
        for cap in extra:
            low = cap.lower()
            assert make_demo._norm(cap) not in banned, (it.item_id, cap)
            if it.modality in ("image", "video"):
                assert any(s in low for s in make_demo.PLAIN_SHAPES[m["shape"]]), (it.item_id, cap)
            if it.modality == "video":
                assert any(s in low for s in make_demo.MOTIONS[m["direction"]] + make_demo.PLAIN_SPEEDS[m["speed"]]
                           + [m["colour"]]), (it.item_id, cap)
            if it.modality == "audio":
                assert any(s in low for s in make_demo.SOUND_NAMES[m["sound"]]), (it.item_id, cap)
    # the same media and template captions without them
    small = dict(images=4, sounds=3, videos=2)
    a = make_demo.make_demo(DemoConfig(out=str(tmp_path / "a"), **small))
    b = make_demo.make_demo(DemoConfig(out=str(tmp_path / "b"), everyday=0, **small))
    assert digest(a.parent, "images/*.png") == digest(b.parent, "images/*.png")
    assert digest(a.parent, "audio/*.wav") == digest(b.parent, "audio/*.wav")
    for x, y in zip(load_corpus(a), load_corpus(b)):
        assert template_captions(x) == y.captions and len(x.captions) == len(y.captions) + cfg.everyday


def test_media_are_small_and_readable(full_demo):
    from PIL import Image

    root = full_demo[0].parent
    corpus = load_corpus(full_demo[0])
    img = Image.open(root / corpus.get("image_000").media)
    assert img.size == (96, 96) and img.mode == "RGB"
    with wave.open(str(root / corpus.get("sound_000").media)) as fh:
        assert fh.getframerate() == 16000 and fh.getnchannels() == 1
        assert fh.getnframes() == int(16000 * 1.5)
    frames = read_video_frames(root / corpus.get("video_000").media, 16)
    assert len(frames) == 12 and frames[0].size == (64, 64)
    # the shape moves: first and last frames differ
    assert np.abs(np.asarray(frames[0], float) - np.asarray(frames[-1], float)).mean() > 1.0


def test_deterministic_for_a_seed(tmp_path):
    small = dict(images=5, sounds=4, videos=3, captions=8, everyday=0)
    a = make_demo.make_demo(DemoConfig(out=str(tmp_path / "a"), seed=7, **small))
    b = make_demo.make_demo(DemoConfig(out=str(tmp_path / "b"), seed=7, **small))
    c = make_demo.make_demo(DemoConfig(out=str(tmp_path / "c"), seed=8, **small))
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    for pattern in ("images/*.png", "audio/*.wav"):
        assert digest(a.parent, pattern) == digest(b.parent, pattern)
    frames_a = [np.asarray(f) for p in sorted((a.parent / "video").glob("*.mp4")) for f in read_video_frames(p, 12)]
    frames_b = [np.asarray(f) for p in sorted((b.parent / "video").glob("*.mp4")) for f in read_video_frames(p, 12)]
    assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b)) and len(frames_a) == 3 * 12
    corpus = load_corpus(a)
    assert len(corpus) == 12 and all(len(it.captions) == 8 for it in corpus)


def test_too_many_items_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="only 72 distinct combinations"):
        make_demo.make_demo(DemoConfig(out=str(tmp_path), images=1, sounds=100, videos=1))


def test_cli(tmp_path, capsys):
    path = make_demo.main(["--out", str(tmp_path), "--images", "2", "--sounds", "2", "--videos", "2"])
    assert path.is_file() and "wrote 2 images, 2 sounds, 2 videos" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["demo_queries.jsonl", "demo_queries_check.jsonl", "demo_queries_fresh.jsonl"])
def test_newcomer_query_set_fits_the_default_demo(full_demo, name):
    """data/demo_queries*.jsonl (eval.query_sets of configs/demo.yaml): every query has relevant items in
    the default demo corpus, none is one of its captions, and each kind of query a newcomer types is there."""
    from ace.pipeline.query_sets import load_query_set, relevant_sets

    path, _ = full_demo
    corpus = load_corpus(path)
    queries = load_query_set(Path(__file__).resolve().parents[1] / "data" / name)
    sets = relevant_sets(queries, corpus.items)  # raises when a query has no relevant item
    assert all(len(s) < len(corpus) / 4 for s in sets)  # each query is selective
    captions = {make_demo._norm(c) for it in corpus.items for c in it.captions}
    assert not [q.query for q in queries if make_demo._norm(q.query) in captions]
    assert {q.modality for q in queries} == {None, "image", "audio", "video"}
    assert len(queries) >= 50


def test_demo_configs_differ_only_on_the_query_side():
    """configs/demo.yaml (frozen MiniLM + hybrid search, the default) and configs/demo_scratch.yaml (the
    previous default) share the corpus, test split, item encoders, identifiers, training queries and
    query sets, so their figures compare the query side only; demo.yaml's report references use the
    names eval writes."""
    import dataclasses

    from ace.config import load_config
    from ace.pipeline.run_config import RunConfig

    root = Path(__file__).resolve().parents[1]
    new, old = (load_config(RunConfig, str(root / "configs" / f"{n}.yaml"), []) for n in ("demo", "demo_scratch"))
    for section in ("corpus", "encoder", "identifiers", "querygen", "fallback"):
        assert getattr(new, section) == getattr(old, section), section
    assert dataclasses.replace(new.split, scorer_queries=0) == old.split  # + captions held out for the hybrid fit
    assert new.hybrid.enabled and new.split.scorer_queries > 0 and new.hybrid.levels == "full"
    assert new.eval.query_sets == old.eval.query_sets and len(new.eval.query_sets) == 3
    assert new.model.pretrained_encoder == "minilm" and new.training.freeze_encoder
    assert old.model.pretrained_encoder in (None, "") and not old.training.freeze_encoder
    assert new.run_dir == "runs/demo" and new.run_dir != old.run_dir
    names = {"held-out R@1"} | {f"{Path(p).stem} top-{k}" for p in new.eval.query_sets for k in (1, 5)}
    assert new.eval.reference and all(set(row) <= names for row in new.eval.reference.values())
