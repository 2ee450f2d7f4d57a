"""``mllm`` backend: a multimodal LLM describes each item from several perspectives (handcrafted prompts)."""
from __future__ import annotations

import logging

from ace.data.corpus import CorpusItem

from .base import GeneratedQuery, QueryBackend, QueryGenError, resolve_device
from .lm import generate_new_tokens, load_error, model_dtype
from .media import MediaError, load_audio, load_image, sample_video_frames

log = logging.getLogger(__name__)

# One prompt per perspective; each asks for something the others do not, so descriptions do not repeat.
DEFAULT_PROMPTS = {
    "image": [
        "List the main objects in this image in one short sentence.",
        "In one short sentence, what are the people or animals in this image doing?",
        "Describe the setting or scene of this image in one short sentence, without listing objects.",
        "Describe the colours, lighting and style of this image in one short sentence.",
        "Write a short search query someone would type to find this exact image.",
    ],
    "audio": [
        "What is making the sounds in this recording? Answer in one short sentence.",
        "In one short sentence, what events or actions can be heard, in order?",
        "Describe the acoustic environment of this recording (indoors, outdoors, distance, background) in one sentence.",
        "Describe the loudness, rhythm and texture of the sounds in one short sentence.",
        "Write a short search query someone would type to find this exact sound.",
    ],
    "video": [
        "In one short sentence, what happens in this video?",
        "List the main objects and people visible in these video frames in one short sentence.",
        "Describe where this video takes place in one short sentence.",
        "Describe the camera style, colours and mood of this video in one short sentence.",
        "Write a short search query someone would type to find this exact video.",
    ],
}


def load_multimodal_model(name_or_path: str, dtype="auto"):
    """(processor, model) for an image-text-to-text or audio-text model from any id or local path."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        processor = AutoProcessor.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - unknown path, offline hub, broken folder
        raise load_error("mllm", name_or_path, exc) from exc
    # transformers v5: image-text-to-text covers LLaVA/Qwen2-VL/BLIP-2...; multimodal-LM adds audio LMs (Qwen2-Audio)
    classes = [getattr(transformers, n, None) for n in
               ("AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModelForVision2Seq")]
    if config.model_type == "qwen2_audio":
        classes.insert(0, getattr(transformers, "Qwen2AudioForConditionalGeneration", None))
    errors = []
    for cls in [c for c in classes if c is not None]:
        try:
            return processor, cls.from_pretrained(name_or_path, dtype=dtype)
        except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{cls.__name__}: {exc}".splitlines()[0])
        except Exception as exc:  # noqa: BLE001
            raise load_error("mllm", name_or_path, exc) from exc
    raise QueryGenError(f"model '{name_or_path}' (type {config.model_type}) is not an image/audio-text-to-text "
                        f"model: {'; '.join(errors)}")


class MLLMBackend(QueryBackend):
    """Per item: one chat turn per perspective prompt (media + prompt), batched per modality, decoded."""

    name = "mllm"

    def __init__(self, *, model: str | None, num_queries: int = 4, prompts: list[str] | None = None,
                 max_new_tokens: int = 32, do_sample: bool | None = None, temperature: float = 0.8,
                 top_p: float = 0.95, seed: int = 0, device: str = "auto", dtype: str = "auto",
                 video_frames: int = 4, batch_size: int = 8, media_root=None):
        super().__init__(media_root=media_root)
        if not model:
            raise QueryGenError("the mllm backend needs model=<id or local path> of a vision/audio-language model "
                                "(none ships offline; see OFFLINE_MODELS.md)")
        self.model_name = model
        self.num_queries = num_queries
        self.prompts = {m: list(prompts) for m in DEFAULT_PROMPTS} if prompts else DEFAULT_PROMPTS
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.do_sample = False if do_sample is None else do_sample
        self.device, self.dtype, self.video_frames, self.batch_size = device, dtype, video_frames, batch_size
        self._processor = self._model = None

    def settings(self) -> dict:
        return {"model": self.model_name, "num_queries": self.num_queries, "prompts": self.prompts,
                "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "dtype": self.dtype, "video_frames": self.video_frames}

    def load(self) -> None:
        if self._model is None:
            device = resolve_device(self.device)
            processor, model = load_multimodal_model(self.model_name, model_dtype(self.dtype, device))
            tok = getattr(processor, "tokenizer", None)
            if tok is not None:
                tok.padding_side = "left"  # decoder-only batching
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
            self._processor, self._model = processor, model.to(device).eval()

    # ---- media and prompts -------------------------------------------------------------------------------
    def _media(self, item: CorpusItem):
        """Decoded media for ``item``: PIL image, list of PIL frames, or float32 waveform; raises MediaError."""
        if item.modality not in ("image", "audio", "video"):
            raise MediaError(f"modality '{item.modality}' has no media for the mllm backend (use captions/paraphrase)")
        path = self.media_path(item)
        if path is None:
            raise MediaError("item has no media path")
        if item.modality == "image":
            return load_image(path)
        if item.modality == "video":
            return sample_video_frames(path, self.video_frames)
        fe = getattr(self._processor, "feature_extractor", None)
        if fe is None:
            raise MediaError(f"model '{self.model_name}' has no audio feature extractor; it cannot take audio")
        return load_audio(path, fe.sampling_rate)

    def _prompt_text(self, modality: str, media, prompt: str) -> str:
        if modality == "audio":
            parts = [{"type": "audio", "audio_url": "item"}]
        else:
            parts = [{"type": "image"}] * (len(media) if modality == "video" else 1)
        msgs = [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]
        if getattr(self._processor, "chat_template", None):
            return self._processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return prompt  # processors without a chat template (BLIP-2 style) take the bare prompt

    def _encode(self, modality: str, texts: list[str], media: list) -> dict:
        if modality == "audio":
            sr = self._processor.feature_extractor.sampling_rate
            enc = self._processor(text=texts, audio=media, sampling_rate=sr, return_tensors="pt", padding=True)
        else:
            images = [fr for m in media for fr in m] if modality == "video" else media
            enc = self._processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = {}
        for k, v in enc.items():  # floating inputs (pixels, mel features) follow the model's dtype (bf16/fp16 on GPU)
            if hasattr(v, "to"):
                dtype = self._model.dtype if v.is_floating_point() else None
                v = v.to(self._model.device, dtype=dtype)
            out[k] = v
        return out

    def _run(self, modality: str, rows: list[tuple]) -> list[str]:
        """Decode one model batch of (item, media, prompt index, prompt) rows into text."""
        texts = [self._prompt_text(modality, media, p) for _, media, _, p in rows]
        enc = self._encode(modality, texts, [media for _, media, _, _ in rows])
        tok = getattr(self._processor, "tokenizer", self._processor)
        new = generate_new_tokens(self._model, enc, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                  temperature=self.temperature, top_p=self.top_p, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, seed=self.seed, stats=self.stats)
        return self._processor.batch_decode(new, skip_special_tokens=True)

    def generate(self, items: list[CorpusItem]) -> list[GeneratedQuery]:
        self.stats.model_calls += 1
        self.stats.items += len(items)
        self.load()
        rows_by_modality: dict[str, list[tuple]] = {}
        for it in items:
            try:
                media = self._media(it)
            except MediaError as exc:
                self.skip(it, str(exc))
                continue
            prompts = self.prompts[it.modality]
            for j in range(self.num_queries):
                k = j % len(prompts)
                rows_by_modality.setdefault(it.modality, []).append((it, media, k, prompts[k]))
        out: list[GeneratedQuery] = []
        for modality, rows in rows_by_modality.items():
            for i in range(0, len(rows), self.batch_size):
                out.extend(self._generate_rows(modality, rows[i:i + self.batch_size]))
        return out

    def _generate_rows(self, modality: str, rows: list[tuple]) -> list[GeneratedQuery]:
        """Run a batch; if it fails, rerun per item so only the item that breaks the processor is skipped."""
        try:
            texts = self._run(modality, rows)
        except (ValueError, RuntimeError, TypeError, OSError) as exc:
            items = list({id(r[0]): r[0] for r in rows}.values())
            if len(items) == 1:
                self.skip(items[0], f"generation failed: {type(exc).__name__}: {exc}")
                return []
            log.warning("mllm batch failed (%s); retrying item by item", exc)
            out = []
            for it in items:
                out.extend(self._generate_rows(modality, [r for r in rows if r[0] is it]))
            return out
        return [GeneratedQuery(it.item_id, " ".join(t.split()), f"mllm/{k}", p)
                for (it, _, k, p), t in zip(rows, texts)]
