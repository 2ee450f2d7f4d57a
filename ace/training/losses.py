"""ACE training loss: token cross-entropy + omega x R-Drop KL between two dropout passes.

R-Drop (Liang et al., 2021): run the same batch through the model twice with independent
dropout masks and pull the two token distributions together with a symmetric KL. The two passes
are one forward over the batch stacked twice (dropout masks differ per row), as in the reference
implementation; ``omega = 0`` turns R-Drop off and runs a single plain pass.

Optional (not in the paper, off by default): ``distill`` = (sibling ids, teacher probabilities,
weight) from ``ace.training.distill.PrefixTeacher`` adds weight x KL(teacher || student) over the sibling
tokens of every level, averaged over the passes; ``anchor`` = (previous model's logits, rows, weight)
adds weight x KL(previous || current) of the full next-token distributions on those rows (``train.py
fold``: the replayed old pairs), averaged over the passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class AceLossOutput:
    """Total loss (to backprop) and its detached parts for logging."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    kd: torch.Tensor | None = None  # distillation term (None when off)
    anchor: torch.Tensor | None = None  # KL to the previous model on replayed rows (None when off)


def _check_logits(logits: torch.Tensor, name: str) -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name} must be (B, T, V), got shape {tuple(logits.shape)}")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over label positions that are not IGNORE_INDEX."""
    _check_logits(logits, "logits")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits (B, T) = {tuple(logits.shape[:2])}")
    if not (labels != IGNORE_INDEX).any():
        raise ValueError("token_cross_entropy: every label is IGNORE_INDEX, nothing to learn from")
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def rdrop_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * (KL(p_a || p_b) + KL(p_b || p_a)) per token, averaged over tokens where mask is true."""
    _check_logits(logits_a, "logits_a")
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"rdrop_kl: logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    if mask is None:
        mask = torch.ones(logits_a.shape[:2], dtype=torch.bool, device=logits_a.device)
    if mask.shape != logits_a.shape[:2]:
        raise ValueError(f"rdrop_kl: mask shape {tuple(mask.shape)} does not match (B, T) = {tuple(logits_a.shape[:2])}")
    mask = mask.bool()
    if not mask.any():
        raise ValueError("rdrop_kl: mask selects no token")
    logp_a = F.log_softmax(logits_a.float(), dim=-1)  # (B, T, V)
    logp_b = F.log_softmax(logits_b.float(), dim=-1)
    kl_ab = (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (B, T)
    kl_ba = (logp_b.exp() * (logp_b - logp_a)).sum(-1)
    kl = 0.5 * (kl_ab + kl_ba)
    return kl[mask].mean()


def _batch_tensors(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [k for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels") if k not in batch]
    if missing:
        raise KeyError(f"ace_loss: batch is missing {', '.join(missing)}")
    return batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["labels"]


def _with_distill(out: AceLossOutput, logits: torch.Tensor, distill, passes: int) -> AceLossOutput:
    """Add weight x KL(teacher || student) (averaged over the dropout passes) to the loss."""
    if distill is None:
        return out
    from ace.training.distill import distillation_loss

    ids, probs, weight = distill
    kd = distillation_loss(logits, ids.repeat(passes, 1, 1), probs.repeat(passes, 1, 1))
    return AceLossOutput(loss=out.loss + weight * kd, ce=out.ce, kl=out.kl, kd=kd.detach())


def _with_anchor(out: AceLossOutput, logits: torch.Tensor, labels: torch.Tensor, anchor, passes: int) -> AceLossOutput:
    """Add weight x KL(previous model || this one) on the anchored rows' label positions (averaged over passes)."""
    if anchor is None:
        return out
    from ace.training.distill import anchor_kl

    teacher_logits, rows, weight = anchor
    mask = (labels != IGNORE_INDEX) & rows.bool()[:, None]
    term = anchor_kl(logits, teacher_logits.repeat(passes, 1, 1), mask.repeat(passes, 1))
    return AceLossOutput(loss=out.loss + weight * term, ce=out.ce, kl=out.kl, kd=out.kd, anchor=term.detach())


def ace_loss(model: torch.nn.Module, batch: dict, omega: float = 0.15, *, distill=None, anchor=None) -> AceLossOutput:
    """CE averaged over two dropout passes + omega * rdrop_kl; one plain pass when omega == 0.
    ``batch["encoder_layer_states"]`` (B, S, N, d), when present, is the output of a frozen encoder
    (ace/training/loop.py caches it) and replaces the encoder forward.
    ``distill`` = (ids (B, L, C), probs (B, L, C), weight) adds the teacher term (ace/training/distill.py);
    ``anchor`` = (previous model's logits (B, T, V), rows (B,) bool, weight) the anchor term (``anchor_kl``)."""
    if omega < 0:
        raise ValueError(f"omega must be >= 0, got {omega}")
    input_ids, attention_mask, decoder_input_ids, labels = _batch_tensors(batch)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}
    states = batch.get("encoder_layer_states")
    if states is not None:  # instead of input_ids
        from ace.model.modeling import AceEncoderOutput

        inputs["input_ids"] = None
        inputs["encoder_outputs"] = AceEncoderOutput(last_hidden_state=states[:, -1], layer_states=states)
    if omega == 0:
        logits = model(**inputs).logits
        ce = token_cross_entropy(logits, labels)
        zero = ce.new_zeros(())
        out = _with_distill(AceLossOutput(loss=ce, ce=ce.detach(), kl=zero), logits, distill, 1)
        return _with_anchor(out, logits, labels, anchor, 1)
    # both passes in one forward: rows [0, B) and [B, 2B) get independent dropout masks; the model
    # shares what has no dropout between them (a frozen encoder, the cross-attention keys/values)
    B = decoder_input_ids.shape[0]
    logits = model(**inputs, num_passes=2).logits  # (2B, T, V)
    logits_a, logits_b = logits[:B], logits[B:]
    ce = token_cross_entropy(logits, labels.repeat(2, 1))  # mean over both passes' tokens
    kl = rdrop_kl(logits_a, logits_b, labels != IGNORE_INDEX)
    loss = ce + omega * kl
    out = _with_distill(AceLossOutput(loss=loss, ce=ce.detach(), kl=kl.detach()), logits, distill, 2)
    return _with_anchor(out, logits, labels, anchor, 2)
