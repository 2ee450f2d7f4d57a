"""Cleaning, degenerate-generation checks and (near-)duplicate removal for generated queries."""
from __future__ import annotations

import re
import unicodedata

_LEAD = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|(?:query|paraphrase|answer|description|caption)\s*\d*\s*:)\s*", re.I)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"
_WORD = re.compile(r"[\w']+", re.UNICODE)


def clean_query(text: str) -> str:
    """Collapse whitespace, strip list markers ("1.", "-", "Query:") and surrounding quotes."""
    text = " ".join(text.split())
    for _ in range(2):
        text = _LEAD.sub("", text).strip().strip(_QUOTES).strip()
    return text


def normalize(text: str) -> str:
    """Lower-case, accents folded, punctuation dropped, whitespace collapsed: the exact-dedup key."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(_WORD.findall(text))


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def degenerate_reason(query: str, *, prompt: str = "", min_words: int = 2, max_token_run: int = 3,
                      min_unique_ratio: float = 0.5) -> str | None:
    """Why ``query`` is unusable ("empty", "too_short", "prompt_echo", "preamble", "repeated_tokens"), or None."""
    toks = tokens(query)
    if not toks:
        return "empty"
    if len(toks) < min_words:
        return "too_short"
    if prompt:
        prompt_toks = tokens(prompt)
        norm, norm_prompt = " ".join(toks), " ".join(prompt_toks)
        if norm in norm_prompt or set(toks) <= set(prompt_toks):
            return "prompt_echo"  # nothing in the query that the instruction did not already say
    low = query.lower()
    if query.rstrip().endswith(":") or low.startswith(("here's", "here is", "sure", "certainly")):
        return "preamble"  # the model announced an answer instead of giving one
    run = 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        if run >= max_token_run:
            return "repeated_tokens"
    if len(toks) >= 6 and len(set(toks)) / len(toks) < min_unique_ratio:
        return "repeated_tokens"
    return None


def char_ngrams(text: str, n: int = 3) -> set[str]:
    text = f" {normalize(text)} "
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateFilter:
    """Keeps a query unless it equals (after ``normalize``) or is too similar to one already kept."""

    def __init__(self, *, method: str = "char_ngram", threshold: float = 0.8, ngram: int = 3):
        self.method, self.threshold, self.ngram = method, threshold, ngram
        self.exact: set[str] = set()
        self.sigs: list[set[str]] = []

    def _sig(self, text: str) -> set[str]:
        return char_ngrams(text, self.ngram) if self.method == "char_ngram" else set(tokens(text))

    def check(self, query: str) -> str | None:
        """"exact_duplicate" / "near_duplicate" if ``query`` repeats a kept one, else keep it and return None."""
        key = normalize(query)
        if key in self.exact:
            return "exact_duplicate"
        sig = self._sig(query)
        if self.threshold < 1.0 and any(jaccard(sig, s) >= self.threshold for s in self.sigs):
            return "near_duplicate"
        self.exact.add(key)
        self.sigs.append(sig)
        return None
