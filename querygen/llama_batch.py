"""Batched decoding on llama.cpp's low-level API: many prompts that share a prefix, decoded together.

One llama.cpp context with a unified key/value cache holds up to ``max_batch`` sequences. For a group
of prompts the longest common prefix (system prompt + one-shot example + the rewrite instruction) is
decoded once as sequence 0 and shared with the others (``llama_memory_seq_cp``: the cells are shared,
not copied); each prompt's own tail is then decoded in one batch, and every generation step decodes
one token of every unfinished sequence in one ``llama_decode`` call, so the weights are read once per
step for the whole group instead of once per sequence.

Sampling runs in numpy on each sequence's logits with its own generator (``np.random.default_rng(seed)``):
temperature, then top-k, then top-p, the order of transformers' sampling; greedy = argmax. The same
prompts in the same batches give the same texts; another batch composition changes how much prefix is
shared and so the float rounding of the logits, which can flip a close sample.
"""
from __future__ import annotations

import ctypes

import numpy as np

from .base import QueryGenError


def sample(logits: np.ndarray, rng: np.random.Generator | None, *, temperature: float, top_k: int,
           top_p: float) -> int:
    """One token id from ``logits``: argmax when ``rng`` is None, else temperature -> top-k -> top-p sampling."""
    if rng is None:
        return int(np.argmax(logits))
    k = min(top_k, logits.size) if top_k > 0 else logits.size
    top = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    top = top[np.argsort(-logits[top], kind="stable")]
    z = logits[top].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p) + 1) if top_p < 1.0 else p.size  # smallest set with mass >= top_p
    p = p[:keep] / p[:keep].sum()
    return int(top[rng.choice(keep, p=p)])


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


class BatchedGenerator:
    """``generate(prompts, seeds, ...)`` -> [(new token ids up to EOS)] for prompts sharing a model."""

    def __init__(self, model, *, n_threads: int | None, max_batch: int = 32, n_ctx: int | None = None,
                 n_batch: int = 512):
        import llama_cpp.llama_cpp as lib

        if max_batch < 1:
            raise QueryGenError(f"llama_batch must be >= 1, got {max_batch}")
        self.lib, self.model, self.max_batch, self.n_batch = lib, model, max_batch, n_batch
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx or max(2048, 128 * max_batch)
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = max_batch
        params.kv_unified = True  # one cache for all sequences: a shared prefix is stored once
        params.no_perf = True
        if n_threads:
            params.n_threads = params.n_threads_batch = n_threads
        self.ctx = lib.llama_init_from_model(model, params)
        if not self.ctx:
            raise QueryGenError(f"llama.cpp could not create a context for {max_batch} sequences of "
                                f"{params.n_ctx} cache cells in all; lower querygen.llama_batch")
        self.n_ctx = params.n_ctx
        self.mem = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.batch = lib.llama_batch_init(n_batch, 0, max_batch)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):  # noqa: D105
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> dict[int, np.ndarray]:
        """Decode (token, position, sequence, wants logits) entries in chunks; {entry index: logits}."""
        out: dict[int, np.ndarray] = {}
        b = self.batch
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            for j, (tok, pos, seq, logits) in enumerate(chunk):
                b.token[j], b.pos[j], b.n_seq_id[j] = tok, pos, 1
                b.seq_id[j][0] = seq
                b.logits[j] = 1 if logits else 0
            b.n_tokens = len(chunk)
            rc = self.lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise QueryGenError(f"llama_decode failed with code {rc} (cache full? {self.n_ctx} cells for "
                                    f"{self.max_batch} sequences); lower querygen.llama_batch or max_new_tokens")
            for j, (_, _, _, logits) in enumerate(chunk):
                if logits:
                    ptr = self.lib.llama_get_logits_ith(self.ctx, j)
                    out[start + j] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                           shape=(self.n_vocab,)).copy()
        return out

    def generate(self, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int, do_sample: bool,
                 temperature: float, top_p: float, top_k: int = 50) -> list[list[int]]:
        """New tokens (EOS excluded) of every prompt, ``max_batch`` prompts at a time."""
        out: list[list[int]] = []
        for i in range(0, len(prompts), self.max_batch):
            out += self._group(prompts[i:i + self.max_batch], seeds[i:i + self.max_batch], max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
        return out

    def _group(self, prompts, seeds, *, max_new_tokens, do_sample, temperature, top_p, top_k) -> list[list[int]]:
        if any(not p for p in prompts):
            raise QueryGenError("an empty prompt cannot be decoded")
        n = len(prompts)
        shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)  # every tail keeps >= 1 token
        cells = shared + sum(len(p) - shared + max_new_tokens for p in prompts)
        if cells > self.n_ctx:
            raise QueryGenError(f"{n} prompts need {cells} cache cells, more than the context's {self.n_ctx}; "
                                f"lower querygen.llama_batch or max_new_tokens")
        self.lib.llama_memory_clear(self.mem, True)
        if shared:
            self._decode([(t, pos, 0, False) for pos, t in enumerate(prompts[0][:shared])])
            for s in range(1, n):
                self.lib.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        entries, last = [], []
        for s, p in enumerate(prompts):
            entries += [(t, shared + j, s, j == len(p) - shared - 1) for j, t in enumerate(p[shared:])]
            last.append(len(entries) - 1)
        logits = self._decode(entries)
        rngs = [np.random.default_rng(seed) if do_sample else None for seed in seeds]
        new: list[list[int]] = [[] for _ in range(n)]
        nxt = [sample(logits[last[s]], rngs[s], temperature=temperature, top_k=top_k, top_p=top_p) for s in range(n)]
        active = list(range(n))
        while True:
            active = [s for s in active if not self.lib.llama_vocab_is_eog(self.vocab, nxt[s])]
            for s in active:
                new[s].append(nxt[s])
            active = [s for s in active if len(new[s]) < max_new_tokens]
            if not active:
                return new
            logits = self._decode([(nxt[s], len(prompts[s]) + len(new[s]) - 1, s, True) for s in active])
            for j, s in enumerate(active):
                nxt[s] = sample(logits[j], rngs[s], temperature=temperature, top_k=top_k, top_p=top_p)
