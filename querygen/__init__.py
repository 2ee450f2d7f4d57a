"""Query generation: turn a corpus into (item_id, query, source) training pairs (see docs/ARCHITECTURE.md)."""
from __future__ import annotations

from .base import GeneratedQuery, ItemFailure, QueryBackend, QueryGenError
from .config import BACKENDS, QueryGenConfig
from .runner import QueryGenSummary, run_querygen


def build_backend(config: QueryGenConfig) -> QueryBackend:
    """The backend named by ``config.backend``, configured from ``config``."""
    common = dict(media_root=config.media_root)
    if config.backend == "captions":
        from .captions import CaptionsBackend
        return CaptionsBackend(caption_indices=config.caption_indices, **common)
    if config.backend == "template":
        from .template import TemplateBackend
        return TemplateBackend(templates=config.templates, num_queries=config.num_queries, seed=config.seed, **common)
    gen = dict(num_queries=config.num_queries, prompts=config.prompts, max_new_tokens=config.max_new_tokens,
               do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p, seed=config.seed,
               device=config.device, dtype=config.dtype, **common)
    if config.backend == "paraphrase":
        from .paraphrase import ParaphraseBackend
        return ParaphraseBackend(model=config.model, system_prompt=config.system_prompt,
                                 caption_indices=config.caption_indices, runtime=config.runtime,
                                 keep_captions=config.keep_captions, num_threads=config.num_threads,
                                 llama_batch=config.llama_batch, llama_requantize=config.llama_requantize, **gen)
    if config.backend == "mllm":
        from .mllm import MLLMBackend
        return MLLMBackend(model=config.model, video_frames=config.video_frames, batch_size=config.batch_size, **gen)
    raise QueryGenError(f"unknown backend '{config.backend}'; known: {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "GeneratedQuery", "ItemFailure", "QueryBackend", "QueryGenConfig", "QueryGenError",
           "QueryGenSummary", "build_backend", "run_querygen"]
