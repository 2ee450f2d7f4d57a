"""Shared helpers for backends that run a transformers model: loading errors, generation, decoding."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import BackendStats, QueryGenError


def model_dtype(name: str, device: str):
    """'auto' -> the checkpoint's dtype on GPU, float32 on CPU (half precision is slow there); or a torch dtype name."""
    if name == "auto":
        return "auto" if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise QueryGenError(f"dtype must be auto, float32, float16 or bfloat16, got '{name}'")
    return dtype


def load_error(kind: str, name_or_path: str, exc: Exception) -> QueryGenError:
    """A clear message for a model that will not load (unknown path, offline hub, wrong architecture)."""
    hint = ""
    if not Path(name_or_path).exists():
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (f" '{name_or_path}' is not a local folder" +
                (" and HF_HUB_OFFLINE=1, so it cannot be fetched from a model hub" if offline else
                 " and could not be fetched from a model hub"))
    return QueryGenError(f"cannot load {kind} model '{name_or_path}':{hint} ({type(exc).__name__}: {exc})")


def generate_new_tokens(model, inputs: dict, *, max_new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float, pad_token_id: int | None, eos_token_id, seed: int,
                        stats: BackendStats, num_return_sequences: int = 1) -> torch.Tensor:
    """``model.generate`` -> only the new tokens (B * num_return_sequences, T_new); counts tokens up to EOS."""
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                  num_return_sequences=num_return_sequences)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)  # (B*R, T_in + T_new) for decoder-only, (B*R, T_new) enc-dec
    if not getattr(model.config, "is_encoder_decoder", False):
        out = out[:, inputs["input_ids"].shape[1]:]
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    if pad_token_id is not None:
        eos.add(pad_token_id)
    for row in out.tolist():
        n = next((i for i, t in enumerate(row) if t in eos), len(row))
        stats.generated_tokens += n
    stats.sequences += out.shape[0]
    return out
