"""Everyday descriptions of the demo items: the demo's query generation step (method step 3).

Besides its template captions (data/make_demo.py), each item gets short descriptions in the words
people use for colours, shapes, motions and sounds: the plain colour name most of the time and
its common variants, shapes named by their everyday names or by a generic noun ("thing",
"object", "shape", "something") with a shape adjective ("round", "triangular"), motion and speed
said several ways, sounds named as people name them and as "a ... sound" / "noise". Written from
general knowledge of how people name these attributes; not from the newcomer query sets (the
generator in make_demo.py drops any description equal to one of their queries).
"""
from __future__ import annotations

import numpy as np


def pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


# the plain name three times out of five: people mostly say "red", sometimes a variant
PLAIN_COLOURS = {
    "red": ["red", "red", "red", "bright red", "scarlet", "cherry red"],
    "green": ["green", "green", "green", "bright green", "lime green", "grass green"],
    "blue": ["blue", "blue", "blue", "bright blue", "royal blue", "cobalt blue"],
    "yellow": ["yellow", "yellow", "yellow", "bright yellow", "lemon yellow", "golden yellow"],
    "purple": ["purple", "purple", "purple", "violet", "dark purple", "mauve"],
    "orange": ["orange", "orange", "orange", "bright orange", "tangerine", "pumpkin orange"],
    "white": ["white", "white", "white", "pure white", "snow white", "off-white"],
    "black": ["black", "black", "black", "jet black", "coal black", "inky black"],
}
PLAIN_SHAPES = {"circle": ["circle", "dot", "disk", "round shape", "ball"], "square": ["square", "box", "block", "tile"],
                "triangle": ["triangle", "three-cornered shape", "triangle shape"],
                "star": ["star", "pointed star", "star shape"], "cross": ["cross", "plus", "plus sign", "plus symbol"]}
SHAPE_ADJECTIVES = {"circle": ["round", "circular"], "square": ["square", "boxy", "square-shaped"],
                    "triangle": ["triangular", "three-sided"], "star": ["star-shaped", "starry"],
                    "cross": ["cross-shaped", "plus-shaped"]}
GENERIC_NOUNS = ["shape", "thing", "object", "figure"]
GENERIC_MOVERS = ["shape", "thing", "object", "something"]   # a video's moving shape named vaguely
PICTURE_WORDS = ["picture of", "image of", "drawing of", "graphic of"]
CLIP_WORDS = ["video of", "clip of", "animation of"]
PLAIN_SIZES = {"small": ["small", "little", "tiny"], "large": ["big", "large"]}
PLAIN_POSITIONS = {"left": ["on the left", "left side", "to the left"], "right": ["on the right", "right side", "to the right"],
                   "top": ["at the top", "top of the image", "up top"], "bottom": ["at the bottom", "bottom of the image", "down low"],
                   "centre": ["in the middle", "centred", "in the center"]}
PLAIN_BACKGROUNDS = {"plain": ["grey background", "plain background"], "striped": ["stripes", "striped background"],
                     "checkered": ["checkerboard", "checked background"], "speckled": ["grainy background", "speckles"]}
MOTIONS = {
    "right": ["moving right", "going right", "heading right", "travelling to the right", "moving left to right",
              "sliding right", "drifting right", "rolling right", "passing to the right"],
    "left": ["moving left", "going left", "heading left", "travelling to the left", "moving right to left",
             "sliding left", "drifting left", "rolling left", "passing to the left"],
    "up": ["moving up", "going up", "rising", "climbing", "ascending", "floating up", "lifting off", "going upward"],
    "down": ["moving down", "going down", "falling", "dropping", "descending", "sinking", "coming down", "going downward"],
}
PLAIN_SPEEDS = {"slow": ["slow", "slowly moving", "unhurried", "slow-moving", "leisurely"],
                "fast": ["fast", "quick", "speedy", "rapid", "fast-moving"]}
PLAIN_ADVERBS = {"slow": ["slowly", "gently", "at a slow pace"], "fast": ["fast", "quickly", "rapidly", "at speed"]}
SOUND_NAMES = {
    "tone": ["beep", "tone", "note", "sine wave", "whistle", "pure note", "ping", "pure tone"],
    "buzz": ["buzz", "buzzer", "hum", "drone", "electric buzz", "rasp", "buzzing", "humming"],
    "chord": ["chord", "harmony", "several notes at once", "organ chord", "triad", "musical chord", "chord of notes"],
    "rising": ["rising tone", "upward sweep", "pitch going up", "ascending note", "rising whistle", "upward glide",
               "rising pitch", "tone sliding up"],
    "falling": ["falling tone", "downward sweep", "pitch going down", "descending note", "falling whistle",
                "downward glide", "falling pitch", "tone sliding down"],
    "noise": ["noise", "hiss", "static", "rushing sound", "hissing noise", "hissing", "radio static", "noise burst"],
    "drum": ["drum", "drumbeat", "percussion", "drum hits", "thumps", "drumming", "drum roll", "thumping"],
    "bell": ["bell", "chime", "ringing", "bell ring", "gong-like ring", "ding", "bell chime"],
}
SOUND_NOUNS = ["sound", "noise"]
SOUND_WORDS = ["sound of", "recording of", "audio of"]
PLAIN_PITCHES = {"low": ["low", "deep", "bass", "low-pitched"], "mid": ["medium", "mid", "middle", "mid-pitched"],
                 "high": ["high", "high-pitched", "shrill", "squeaky"]}
PITCH_LEVELS = {"low": ["low", "deep"], "mid": ["medium", "middle"], "high": ["high", "very high"]}
PLAIN_RHYTHMS = {"steady": ["steady", "constant", "continuous", "long", "nonstop"],
                 "slow": ["slow pulsing", "slowly repeating", "slow beats of"],
                 "fast": ["fast pulsing", "rapidly repeating", "quick bursts of", "stuttering"]}


def everyday_templates(modality: str, a: dict) -> list:
    """Templates (rng -> text) of an item's everyday descriptions; the first is the most common form."""
    def w(table, key):
        return lambda r: pick(r, table[a[key]])

    def f(table):
        return lambda r: pick(r, table)

    g, adj = f(GENERIC_NOUNS), w(SHAPE_ADJECTIVES, "shape")
    if modality == "image":
        c, s, z = w(PLAIN_COLOURS, "colour"), w(PLAIN_SHAPES, "shape"), w(PLAIN_SIZES, "size")
        p, b = w(PLAIN_POSITIONS, "position"), w(PLAIN_BACKGROUNDS, "background")
        return [lambda r: f"{c(r)} {s(r)}", lambda r: f"{z(r)} {c(r)} {s(r)}", lambda r: f"{c(r)} {s(r)} {p(r)}",
                lambda r: f"{s(r)} that is {c(r)}", lambda r: f"{c(r)} coloured {s(r)}", lambda r: f"{c(r)} {s(r)} on {b(r)}",
                lambda r: f"{z(r)} {s(r)} {p(r)}", lambda r: f"{s(r)}, {c(r)}, {z(r)}",
                lambda r: f"{z(r)} {c(r)} {g(r)}", lambda r: f"{adj(r)} {c(r)} {g(r)}", lambda r: f"{c(r)} {g(r)} {p(r)}",
                lambda r: f"{pick(r, PICTURE_WORDS)} {with_article(c(r) + ' ' + s(r))}"]
    if modality == "video":
        c, s, m, v = w(PLAIN_COLOURS, "colour"), w(PLAIN_SHAPES, "shape"), w(MOTIONS, "direction"), w(PLAIN_SPEEDS, "speed")
        adv, mover = w(PLAIN_ADVERBS, "speed"), f(GENERIC_MOVERS)
        return [lambda r: f"{c(r)} {s(r)} {m(r)}", lambda r: f"{s(r)} {m(r)}", lambda r: f"{v(r)} {s(r)} {m(r)}",
                lambda r: f"{c(r)} {s(r)} {m(r)} {adv(r)}", lambda r: f"{v(r)} {c(r)} {s(r)}",
                lambda r: f"{c(r)} {s(r)}, {m(r)}", lambda r: f"{s(r)} {m(r)} on {a['background']}",
                lambda r: f"{c(r)} {g(r)} {m(r)}", lambda r: f"{mover(r)} {m(r)} {adv(r)}",
                lambda r: f"{adj(r)} {g(r)} {m(r)}", lambda r: f"{pick(r, CLIP_WORDS)} {with_article(s(r))} {m(r)}"]
    k, p, m = w(SOUND_NAMES, "sound"), w(PLAIN_PITCHES, "pitch"), w(PLAIN_RHYTHMS, "rhythm")
    return [lambda r: f"{k(r)}", lambda r: f"{p(r)} {k(r)}", lambda r: f"{m(r)} {k(r)}", lambda r: f"{m(r)} {p(r)} {k(r)}",
            lambda r: f"{k(r)}, {pick(r, PITCH_LEVELS[a['pitch']])} pitch", lambda r: f"a {k(r)} sound",
            lambda r: f"{p(r)} {k(r)}, {m(r)}", lambda r: f"{p(r)} {k(r)} {pick(r, SOUND_NOUNS)}",
            lambda r: f"{pick(r, SOUND_WORDS)} {with_article(k(r))}"]
