"""Make the embedded demonstration corpus: rendered images, synthesised sounds, short videos.

No network, no data from the user, deterministic for a seed. Every item has ~10 captions written
from several templates with synonyms, so held-out captions are paraphrases of the training ones,
and every caption names what the offline encoders can plausibly tell apart (colour, shape, size,
position, pitch, timbre, rhythm, motion direction, speed).

    python data/make_demo.py                       # -> data/demo/{images,audio,video}/ + corpus.jsonl
    python data/make_demo.py --images 80 --sounds 60 --videos 40 --seed 1 --out /tmp/demo

This is a demonstration corpus: synthetic media with template captions, small enough to encode,
index, train and evaluate in minutes on 2 CPU cores. It is not a benchmark of real retrieval.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ---- vocabulary ---------------------------------------------------------------------------------

COLOURS = {  # name: (RGB, synonyms)
    "red": ((220, 30, 30), ["red", "bright red", "scarlet", "crimson"]),
    "green": ((30, 170, 50), ["green", "bright green", "grass-green", "emerald"]),
    "blue": ((35, 70, 220), ["blue", "deep blue", "royal blue", "cobalt"]),
    "yellow": ((240, 220, 30), ["yellow", "bright yellow", "lemon-yellow", "golden"]),
    "purple": ((140, 40, 170), ["purple", "violet", "dark purple", "plum-coloured"]),
    "orange": ((245, 140, 20), ["orange", "bright orange", "tangerine", "amber"]),
    "white": ((250, 250, 250), ["white", "pure white", "snow-white", "pale white"]),
    "black": ((15, 15, 15), ["black", "jet-black", "dark black", "pitch-black"]),
}
SHAPES = {
    "circle": ["circle", "disc", "round dot", "ball"],
    "square": ["square", "box", "block", "square tile"],
    "triangle": ["triangle", "triangular shape", "pyramid shape", "three-sided shape"],
    "star": ["star", "five-pointed star", "star shape", "starburst"],
    "cross": ["cross", "plus sign", "plus shape", "cross mark"],
}
SIZES = {"small": ["small", "little", "tiny", "modest-sized"], "large": ["large", "big", "huge", "oversized"]}
POSITIONS = {
    "left": ["on the left", "at the left side", "towards the left edge", "in the left part of the picture"],
    "right": ["on the right", "at the right side", "towards the right edge", "in the right part of the picture"],
    "top": ["at the top", "near the top edge", "in the upper part", "high up in the frame"],
    "bottom": ["at the bottom", "near the bottom edge", "in the lower part", "low in the frame"],
    "centre": ["in the centre", "in the middle", "right in the middle", "at the centre of the picture"],
}
BACKGROUNDS = {
    "plain": ["a plain grey background", "a flat grey backdrop", "an empty grey background", "a uniform grey field"],
    "striped": ["a striped background", "a background of stripes", "diagonal stripes", "a lined pattern"],
    "checkered": ["a checkered background", "a chequerboard", "a checkerboard pattern", "a grid of squares"],
    "speckled": ["a speckled background", "a noisy grainy background", "a dotted, grainy texture", "random speckles"],
}

SOUNDS = {  # timbre / kind of sound
    "tone": ["pure tone", "sine tone", "clean beep", "smooth whistle-like tone"],
    "buzz": ["buzzing tone", "harsh square-wave buzz", "raspy electronic buzz", "buzzer sound"],
    "chord": ["chord", "major chord", "harmonious chord of three notes", "organ-like chord"],
    "rising": ["rising sweep", "upward chirp", "ascending glide", "pitch that slides upward"],
    "falling": ["falling sweep", "downward chirp", "descending glide", "pitch that slides downward"],
    "noise": ["noise burst", "hiss of noise", "static noise", "rushing noise"],
    "drum": ["drum beat", "percussive thump", "knocking drum hits", "tapping percussion"],
    "bell": ["bell", "ringing bell", "metallic chime", "bell-like ding"],
}
PITCHES = {"low": ["low", "deep", "low-pitched", "bass"], "mid": ["medium-pitched", "mid-range", "middle-pitch", "moderate-pitch"],
           "high": ["high", "shrill", "high-pitched", "piercing"]}
PITCH_LEVELS = {"low": ["low", "deep"], "mid": ["medium", "middle"], "high": ["high", "very high"]}  # "at a ... pitch"
PITCH_HZ = {"low": 160.0, "mid": 480.0, "high": 1400.0}
RHYTHMS = {
    "steady": ["steady", "continuous", "sustained", "unbroken"],
    "slow": ["slowly pulsing", "repeating slowly", "slow, evenly spaced", "lazily repeating"],
    "fast": ["rapidly pulsing", "quickly repeating", "fast, stuttering", "rapid-fire"],
}
RHYTHM_HZ = {"steady": 0.0, "slow": 2.0, "fast": 7.0}

DIRECTIONS = {
    "right": ["moves from left to right", "slides to the right", "travels rightwards", "glides across to the right"],
    "left": ["moves from right to left", "slides to the left", "travels leftwards", "glides across to the left"],
    "up": ["moves upward", "rises up the frame", "climbs towards the top", "floats upwards"],
    "down": ["moves downward", "falls down the frame", "drops towards the bottom", "sinks downwards"],
}
SPEEDS = {"slow": ["slowly", "gently", "at a leisurely pace", "unhurriedly"],
          "fast": ["quickly", "rapidly", "at high speed", "swiftly"]}
VIDEO_BACKGROUNDS = {"dark": ((30, 30, 40), ["a dark background", "a black backdrop", "a dim background", "darkness"]),
                     "light": ((215, 215, 205), ["a light background", "a pale backdrop", "a bright background", "a white-ish field"])}


def pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def make_captions(rng: np.random.Generator, templates: list, n: int, attempts: int = 200) -> list[str]:
    """n distinct captions; caption 1 comes from the first (most complete) template."""
    out: list[str] = []
    for t in range(attempts):
        fn = templates[0] if not out else templates[int(rng.integers(len(templates)))]
        cap = fn(rng).strip()
        cap = cap[0].upper() + cap[1:]
        if cap not in out:
            out.append(cap)
        if len(out) == n:
            break
    return out


# ---- images -------------------------------------------------------------------------------------

def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
                (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=rgb)


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 grey-ish texture."""
    base = float(rng.uniform(105, 150))
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "plain":
        img = np.full((size, size), base)
    elif kind == "striped":
        period = int(rng.integers(8, 14))
        img = base + 16 * (((xx + yy) // (period // 2)) % 2 * 2 - 1)
    elif kind == "checkered":
        cell = int(rng.integers(8, 16))
        img = base + 16 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)
    else:  # speckled
        img = base + rng.normal(0, 14, (size, size))
    tint = rng.uniform(-8, 8, 3)
    return np.clip(img[..., None] + tint, 0, 255).astype(np.uint8)


def render_image(attrs: dict, size: int, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(background(attrs["background"], size, rng))
    centre = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
    fx, fy = centre[attrs["position"]]
    jitter = rng.uniform(-0.03, 0.03, 2)
    r = size * (0.14 if attrs["size"] == "small" else 0.24) * rng.uniform(0.92, 1.08)
    draw_shape(ImageDraw.Draw(img), attrs["shape"], (fx + jitter[0]) * size, (fy + jitter[1]) * size, r,
               COLOURS[attrs["colour"]][0])
    return img


def image_templates(a: dict) -> list:
    c = lambda r: pick(r, COLOURS[a["colour"]][1])
    s = lambda r: pick(r, SHAPES[a["shape"]])
    z = lambda r: pick(r, SIZES[a["size"]])
    p = lambda r: pick(r, POSITIONS[a["position"]])
    b = lambda r: pick(r, BACKGROUNDS[a["background"]])
    return [
        lambda r: f"{with_article(z(r) + ' ' + c(r) + ' ' + s(r))} {p(r)} on {b(r)}",
        lambda r: f"{with_article(c(r) + ' ' + s(r))} {p(r)}, drawn on {b(r)}",
        lambda r: f"a picture of {with_article(z(r) + ' ' + c(r) + ' ' + s(r))} {p(r)}",
        lambda r: f"{b(r)} with {with_article(z(r) + ' ' + c(r) + ' ' + s(r))} {p(r)}",
        lambda r: f"there is {with_article(c(r) + ' ' + s(r))} {p(r)}",
        lambda r: f"{p(r)} sits {with_article(z(r) + ' ' + s(r))} coloured {c(r)}",
        lambda r: f"image showing {with_article(c(r) + ' ' + s(r))}, {z(r)}, placed {p(r)}",
        lambda r: f"{with_article(s(r))} in {c(r)}, {z(r)}, on {b(r)}",
        lambda r: f"a {c(r)} {s(r)} that looks {z(r)}, {p(r)}",
        lambda r: f"simple graphic: {c(r)} {s(r)} {p(r)} over {b(r)}",
    ]


# ---- sounds -------------------------------------------------------------------------------------

def synth_sound(attrs: dict, sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    f0 = PITCH_HZ[attrs["pitch"]] * rng.uniform(0.95, 1.05)
    kind = attrs["sound"]
    if kind == "tone":
        y = np.sin(2 * np.pi * f0 * t)
    elif kind == "buzz":
        y = np.sign(np.sin(2 * np.pi * f0 * t)) * 0.6
    elif kind == "chord":
        y = sum(np.sin(2 * np.pi * f0 * m * t) for m in (1.0, 1.26, 1.5)) / 3
    elif kind in ("rising", "falling"):
        lo, hi = f0 / 2, f0 * 2
        f = np.geomspace(lo, hi, t.size) if kind == "rising" else np.geomspace(hi, lo, t.size)
        y = np.sin(2 * np.pi * np.cumsum(f) / sr)
    elif kind == "noise":
        spec = np.fft.rfft(rng.normal(0, 1, t.size))
        freqs = np.fft.rfftfreq(t.size, 1 / sr)
        spec *= np.exp(-0.5 * (np.log(np.maximum(freqs, 1) / f0) / 0.5) ** 2)  # band around f0
        y = np.fft.irfft(spec, t.size)
    elif kind == "drum":
        y = np.zeros_like(t)
        hit_t = np.arange(int(0.25 * sr)) / sr
        hit = np.sin(2 * np.pi * f0 * 0.6 * hit_t * (1 + np.exp(-hit_t * 30))) * np.exp(-hit_t * 18)
        hit += rng.normal(0, 0.3, hit_t.size) * np.exp(-hit_t * 60)
        period = 1.0 / (RHYTHM_HZ[attrs["rhythm"]] or 12.0)  # steady = a continuous drum roll
        for start in np.arange(0, seconds, period):
            s0 = int(start * sr)
            n = min(hit.size, t.size - s0)
            y[s0:s0 + n] += hit[:n]
    else:  # bell: inharmonic partials, exponential decay, restruck by the rhythm
        partials = (1.0, 2.76, 5.4, 8.93)
        y = sum(np.sin(2 * np.pi * f0 * p * t) / (i + 1) for i, p in enumerate(partials))
        y *= np.exp(-t * 3.0)
    rate = RHYTHM_HZ[attrs["rhythm"]]
    if rate > 0 and kind not in ("drum",):
        gate = (np.sin(2 * np.pi * rate * t) > 0).astype(np.float64)
        y = y * np.convolve(gate, np.ones(int(sr * 0.005)) / int(sr * 0.005), mode="same")  # soft edges
    fade = np.minimum(1, np.minimum(t, t[-1] - t) / 0.01)
    y = y * fade
    return (0.8 * y / (np.max(np.abs(y)) + 1e-9)).astype(np.float32)


def write_wav(path: Path, y: np.ndarray, sr: int) -> None:
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sr)
        fh.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())


def sound_templates(a: dict) -> list:
    k = lambda r: pick(r, SOUNDS[a["sound"]])
    p = lambda r: pick(r, PITCHES[a["pitch"]])
    m = lambda r: pick(r, RHYTHMS[a["rhythm"]])
    lv = lambda r: pick(r, PITCH_LEVELS[a["pitch"]])
    return [
        lambda r: f"{with_article(m(r) + ' ' + p(r) + ' ' + k(r))}",
        lambda r: f"the sound of {with_article(p(r) + ' ' + k(r))}, {m(r)}",
        lambda r: f"{with_article(k(r))} at a {lv(r)} pitch, {m(r)}",
        lambda r: f"you can hear {with_article(m(r) + ' ' + k(r))} that is {p(r)}",
        lambda r: f"audio of {with_article(p(r) + ' ' + k(r))} which is {m(r)}",
        lambda r: f"{m(r)} {k(r)}, {lv(r)} in pitch",
        lambda r: f"{with_article(p(r) + ' ' + k(r))} playing, {m(r)}",
        lambda r: f"recording: {k(r)}, {p(r)}, {m(r)}",
        lambda r: f"a synthetic {k(r)} with a {p(r)} sound, {m(r)}",
        lambda r: f"short clip of {with_article(m(r) + ' ' + k(r))}, {p(r)}",
    ]


# ---- videos -------------------------------------------------------------------------------------

def render_video_frames(attrs: dict, size: int, frames: int, rng: np.random.Generator) -> list[np.ndarray]:
    travel = 0.3 if attrs["speed"] == "slow" else 0.62
    start = 0.5 - travel / 2 + rng.uniform(-0.05, 0.05)
    cross = 0.5 + rng.uniform(-0.15, 0.15)  # the coordinate that does not move
    r = size * 0.16
    bg = np.array(VIDEO_BACKGROUNDS[attrs["background"]][0], dtype=np.uint8)
    out = []
    for f in range(frames):
        pos = start + travel * f / (frames - 1)
        if attrs["direction"] in ("left", "up"):
            pos = 1 - pos
        cx, cy = (pos, cross) if attrs["direction"] in ("left", "right") else (cross, pos)
        img = Image.fromarray(np.broadcast_to(bg, (size, size, 3)).copy())
        draw_shape(ImageDraw.Draw(img), attrs["shape"], cx * size, cy * size, r, COLOURS[attrs["colour"]][0])
        out.append(np.asarray(img))
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """RGB uint8 frames -> H.264 MP4 (PyAV's bundled libx264), a format browsers play (the search page's
    video cards); MPEG-4 part 2, FFmpeg's built-in encoder, is not played by Chromium."""
    import av

    if "libx264" not in av.codecs_available:
        raise RuntimeError("PyAV was built without libx264 (the demo's H.264 videos): install the PyAV wheel from PyPI")
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "16", "preset": "medium", "threads": "1"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_templates(a: dict) -> list:
    c = lambda r: pick(r, COLOURS[a["colour"]][1])
    s = lambda r: pick(r, SHAPES[a["shape"]])
    d = lambda r: pick(r, DIRECTIONS[a["direction"]])
    v = lambda r: pick(r, SPEEDS[a["speed"]])
    b = lambda r: pick(r, VIDEO_BACKGROUNDS[a["background"]][1])
    return [
        lambda r: f"{with_article(c(r) + ' ' + s(r))} {d(r)} {v(r)} on {b(r)}",
        lambda r: f"a video of {with_article(c(r) + ' ' + s(r))} that {d(r)} {v(r)}",
        lambda r: f"on {b(r)}, {with_article(c(r) + ' ' + s(r))} {d(r)}",
        lambda r: f"animation: {with_article(s(r))} in {c(r)} {d(r)} {v(r)}",
        lambda r: f"{v(r)}, {with_article(c(r) + ' ' + s(r))} {d(r)}",
        lambda r: f"clip where {with_article(c(r) + ' ' + s(r))} {d(r)} across {b(r)}",
        lambda r: f"moving {c(r)} {s(r)}: it {d(r)} {v(r)}",
        lambda r: f"{with_article(s(r))}, coloured {c(r)}, {d(r)} {v(r)}",
        lambda r: f"short video, {c(r)} {s(r)} {d(r)} against {b(r)}",
        lambda r: f"the {c(r)} {s(r)} {d(r)} {v(r)}",
    ]


# ---- everyday descriptions ----------------------------------------------------------------------
# The query generation step of the demo (method step 3: diverse descriptions per item): besides the
# template captions above, each item gets short descriptions in the words people use, with the
# motion and the kind of sound phrased several ways. They are training captions only (placed
# before the last two captions, which configs/demo.yaml holds out) and come from a random stream of
# their own, so the media and the other captions are the same as without them.

PLAIN_SHAPES = {"circle": ["circle", "dot", "disk", "round shape", "ball"], "square": ["square", "box", "block", "tile"],
                "triangle": ["triangle", "three-cornered shape", "triangle shape"],
                "star": ["star", "pointed star", "star shape"], "cross": ["cross", "plus", "plus sign", "plus symbol"]}
PLAIN_SIZES = {"small": ["small", "little", "tiny"], "large": ["big", "large"]}
PLAIN_POSITIONS = {"left": ["on the left", "left side", "to the left"], "right": ["on the right", "right side", "to the right"],
                   "top": ["at the top", "top of the image", "up top"], "bottom": ["at the bottom", "bottom of the image", "down low"],
                   "centre": ["in the middle", "centred", "in the center"]}
PLAIN_BACKGROUNDS = {"plain": ["grey background", "plain background"], "striped": ["stripes", "striped background"],
                     "checkered": ["checkerboard", "checked background"], "speckled": ["grainy background", "speckles"]}
MOTIONS = {
    "right": ["moving right", "going right", "heading right", "travelling to the right", "moving left to right", "sliding right"],
    "left": ["moving left", "going left", "heading left", "travelling to the left", "moving right to left", "sliding left"],
    "up": ["moving up", "going up", "rising", "climbing", "ascending", "floating up"],
    "down": ["moving down", "going down", "falling", "dropping", "descending", "sinking"],
}
PLAIN_SPEEDS = {"slow": ["slow", "slowly moving", "unhurried"], "fast": ["fast", "quick", "speedy"]}
PLAIN_ADVERBS = {"slow": ["slowly", "gently"], "fast": ["fast", "quickly"]}
SOUND_NAMES = {
    "tone": ["beep", "tone", "note", "sine wave", "whistle", "pure note"],
    "buzz": ["buzz", "buzzer", "hum", "drone", "electric buzz", "rasp"],
    "chord": ["chord", "harmony", "several notes at once", "organ chord", "triad"],
    "rising": ["rising tone", "upward sweep", "pitch going up", "ascending note", "rising whistle", "upward glide"],
    "falling": ["falling tone", "downward sweep", "pitch going down", "descending note", "falling whistle", "downward glide"],
    "noise": ["noise", "hiss", "static", "rushing sound", "hissing noise"],
    "drum": ["drum", "drumbeat", "percussion", "drum hits", "thumps"],
    "bell": ["bell", "chime", "ringing", "bell ring", "gong-like ring"],
}
PLAIN_PITCHES = {"low": ["low", "deep", "bass"], "mid": ["medium", "mid", "middle"], "high": ["high", "high-pitched", "shrill"]}
PLAIN_RHYTHMS = {"steady": ["steady", "constant", "continuous", "long"], "slow": ["slow pulsing", "slowly repeating", "slow beats of"],
                 "fast": ["fast pulsing", "rapidly repeating", "quick bursts of"]}


def everyday_templates(modality: str, a: dict) -> list:
    def w(table, key):
        return lambda r: pick(r, table[a[key]])

    if modality == "image":
        c, s, z = (lambda r: a["colour"]), w(PLAIN_SHAPES, "shape"), w(PLAIN_SIZES, "size")
        p, b = w(PLAIN_POSITIONS, "position"), w(PLAIN_BACKGROUNDS, "background")
        return [lambda r: f"{c(r)} {s(r)}", lambda r: f"{z(r)} {c(r)} {s(r)}", lambda r: f"{c(r)} {s(r)} {p(r)}",
                lambda r: f"{s(r)} that is {c(r)}", lambda r: f"{c(r)} coloured {s(r)}", lambda r: f"{c(r)} {s(r)} on {b(r)}",
                lambda r: f"{z(r)} {s(r)} {p(r)}", lambda r: f"{s(r)}, {c(r)}, {z(r)}"]
    if modality == "video":
        c, s, m, v = (lambda r: a["colour"]), w(PLAIN_SHAPES, "shape"), w(MOTIONS, "direction"), w(PLAIN_SPEEDS, "speed")
        return [lambda r: f"{c(r)} {s(r)} {m(r)}", lambda r: f"{s(r)} {m(r)}", lambda r: f"{v(r)} {s(r)} {m(r)}",
                lambda r: f"{c(r)} {s(r)} {m(r)} {pick(r, PLAIN_ADVERBS[a['speed']])}",
                lambda r: f"{v(r)} {c(r)} {s(r)}", lambda r: f"{c(r)} {s(r)}, {m(r)}", lambda r: f"{s(r)} {m(r)} on {a['background']}"]
    k, p, m = w(SOUND_NAMES, "sound"), w(PLAIN_PITCHES, "pitch"), w(PLAIN_RHYTHMS, "rhythm")
    return [lambda r: f"{k(r)}", lambda r: f"{p(r)} {k(r)}", lambda r: f"{m(r)} {k(r)}", lambda r: f"{m(r)} {p(r)} {k(r)}",
            lambda r: f"{k(r)}, {pick(r, PITCH_LEVELS[a['pitch']])} pitch", lambda r: f"a {k(r)} sound", lambda r: f"{p(r)} {k(r)}, {m(r)}"]


# ---- corpus -------------------------------------------------------------------------------------

@dataclass
class DemoConfig:
    out: str = "data/demo"
    seed: int = 0
    images: int = 64
    sounds: int = 48
    videos: int = 40
    captions: int = 10
    everyday: int = 8              # extra training captions per item (everyday_templates); 0 = none
    held_out: int = 2              # the last captions stay last (configs/demo.yaml holds the last two out)
    image_size: int = 96
    sample_rate: int = 16000
    sound_seconds: float = 1.5
    video_size: int = 64
    video_frames: int = 12


def sample_attributes(rng: np.random.Generator, space: dict[str, list[str]], n: int) -> list[dict]:
    """n distinct attribute combinations, spread so every value of every attribute is used."""
    names = list(space)
    combos = list(itertools.product(*(space[k] for k in names)))
    if n > len(combos):
        raise ValueError(f"asked for {n} items but only {len(combos)} distinct combinations exist")
    order = rng.permutation(len(combos))[:n]
    return [dict(zip(names, combos[i])) for i in sorted(order)]


EVAL_QUERY_SETS = ("demo_queries.jsonl", "demo_queries_check.jsonl", "demo_queries_fresh.jsonl")  # beside this file: the newcomer query sets


def _norm(text: str) -> str:
    words = "".join(ch if ch.isalnum() or ch in " -" else " " for ch in text.lower()).split()
    return " ".join(words[1:] if words and words[0] in ("a", "an", "the") else words)


def eval_queries() -> set[str]:
    """The newcomer evaluation queries, normalised: an everyday description equal to one is not made
    (held-out queries must stay unseen, as the held-out captions are)."""
    out = set()
    for name in EVAL_QUERY_SETS:
        path = Path(__file__).resolve().parent / name
        if path.is_file():
            out |= {_norm(json.loads(line)["query"]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    return out


def with_everyday(captions: list[str], rng: np.random.Generator, modality: str, a: dict, cfg: DemoConfig) -> list[str]:
    """The template captions with cfg.everyday everyday descriptions (distinct, none equal to a template
    caption) inserted before the last cfg.held_out captions."""
    if cfg.everyday <= 0:
        return captions
    banned = {_norm(c) for c in captions} | eval_queries()
    extra = [c for c in make_captions(rng, everyday_templates(modality, a), cfg.everyday + len(captions))
             if _norm(c) not in banned][: cfg.everyday]
    cut = len(captions) - cfg.held_out
    return captions[:cut] + extra + captions[cut:]


def make_demo(cfg: DemoConfig) -> Path:
    """Write media + corpus.jsonl under cfg.out; returns the corpus path."""
    out = Path(cfg.out)
    for sub in ("images", "audio", "video"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    cap_rng = np.random.default_rng([cfg.seed, 1])  # the everyday descriptions' own stream
    rows = []
    img_space = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS),
                 "background": list(BACKGROUNDS)}
    for i, a in enumerate(sample_attributes(rng, img_space, cfg.images)):
        rel = f"images/image_{i:03d}.png"
        render_image(a, cfg.image_size, rng).save(out / rel, optimize=False)
        rows.append({"item_id": f"image_{i:03d}", "modality": "image", "media": rel,
                     "captions": with_everyday(make_captions(rng, image_templates(a), cfg.captions), cap_rng, "image", a, cfg), "metadata": a})
    snd_space = {"sound": list(SOUNDS), "pitch": list(PITCHES), "rhythm": list(RHYTHMS)}
    for i, a in enumerate(sample_attributes(rng, snd_space, cfg.sounds)):
        rel = f"audio/sound_{i:03d}.wav"
        write_wav(out / rel, synth_sound(a, cfg.sample_rate, cfg.sound_seconds, rng), cfg.sample_rate)
        rows.append({"item_id": f"sound_{i:03d}", "modality": "audio", "media": rel,
                     "captions": with_everyday(make_captions(rng, sound_templates(a), cfg.captions), cap_rng, "audio", a, cfg), "metadata": a})
    vid_space = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS), "speed": list(SPEEDS),
                 "background": list(VIDEO_BACKGROUNDS)}
    for i, a in enumerate(sample_attributes(rng, vid_space, cfg.videos)):
        rel = f"video/video_{i:03d}.mp4"
        write_video(out / rel, render_video_frames(a, cfg.video_size, cfg.video_frames, rng))
        rows.append({"item_id": f"video_{i:03d}", "modality": "video", "media": rel,
                     "captions": with_everyday(make_captions(rng, video_templates(a), cfg.captions), cap_rng, "video", a, cfg), "metadata": a})
    path = out / "corpus.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in DemoConfig().__dict__.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args(argv)
    cfg = DemoConfig(**vars(args))
    t0 = time.time()
    path = make_demo(cfg)
    print(f"wrote {cfg.images} images, {cfg.sounds} sounds, {cfg.videos} videos -> {path} in {time.time() - t0:.1f}s")
    return path


if __name__ == "__main__":
    main()
