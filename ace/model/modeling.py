"""AceModel: a query encoder with S layers and an identifier decoder that fuses all of them.

Every decoder layer is pre-LayerNorm: causal self-attention -> ``FusionCrossAttention`` (coarse +
fine fusion over the S encoder layer outputs, ace/model/fusion.py) -> feed-forward. The output head
scores identifier tokens (``IdentifierVocab``): logits (B, T, V_id).

Teacher forcing: decoder input ``[BOS, t1 .. t_{L-1}]``, labels ``[t1 .. tL]`` (fixed length).

Default size (CPU-friendly, see ``AceConfig``): d_model 256, 4 heads, 3 encoder + 3 decoder
layers, ffn 1024, dropout 0.1 (~12M parameters with an 8k query vocabulary).

Optionally the encoder is a pretrained BERT-style text encoder (``pretrained_encoder`` = a local
folder, e.g. ``ace.data.encoders.minilm_path()``): its last S layers are fused, ``d_model`` must be its
hidden size, and the query tokenizer must be its tokenizer (``QueryTokenizer.from_pretrained``).
The architecture is stored in the config, so ``from_pretrained`` of a saved AceModel does not
need that folder any more; fresh ``AceModel(config)`` copies the pretrained weights in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput

from ace.model.config import AceConfig
from ace.model.fusion import FusionCrossAttention
from ace.model.tokens import NUM_SPECIAL, PAD


class AceInputError(ValueError):
    """Inputs to AceModel have the wrong shape, dtype or values; the message says which."""


@dataclass
class AceEncoderOutput(ModelOutput):
    """Encoder output; ``layer_states`` (B, S, N, d) holds the S fused layers (a tensor, so HF
    generation expands it across beams)."""

    last_hidden_state: torch.Tensor | None = None
    layer_states: torch.Tensor | None = None


# ---------------------------------------------------------------- building blocks

class FeedForward(nn.Module):
    def __init__(self, *, d_model: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, ffn_dim), nn.Linear(ffn_dim, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention; padding mask (encoder), causal (decoder) or a key/value cache (step)."""

    def __init__(self, *, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, *, mask=None, causal=False, cache=None):
        """x (B, T, d) -> (B, T, d), new cache ((B, H, t + T, dh) keys and values)."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, d)), (k, v)


class EncoderLayer(nn.Module):
    def __init__(self, *, d_model, n_heads, ffn_dim, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.ffn = FeedForward(d_model=d_model, ffn_dim=ffn_dim, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.ln1(x), mask=mask)[0])
        return x + self.ffn(self.ln2(x))


class DecoderLayer(nn.Module):
    """Causal self-attention -> coarse-to-fine fusion over encoder layers -> feed-forward."""

    def __init__(self, *, d_model, n_heads, ffn_dim, dropout, num_encoder_layers, fusion):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model=d_model, n_heads=n_heads, dropout=dropout)
        self.cross = FusionCrossAttention(d_model=d_model, n_heads=n_heads, num_layers=num_encoder_layers,
                                          dropout=dropout, fusion=fusion)
        self.ffn = FeedForward(d_model=d_model, ffn_dim=ffn_dim, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, mask, cache=None):
        """Full sequence (cache None): x (B, T, d), causal. Step: x (B, W, d) = one new token for
        each of W beams, cache (B*W, H, t, dh) per beam. Returns x and the new cache."""
        B, T, d = x.shape
        if cache is None:
            h, new_cache = self.attn(self.ln1(x), causal=True)
        else:
            h, new_cache = self.attn(self.ln1(x).reshape(B * T, 1, d), cache=cache or None)
            h = h.view(B, T, d)
        x = x + self.drop(h)
        x = x + self.drop(self.cross(self.ln2(x), memory, mask))
        return x + self.ffn(self.ln3(x)), new_cache


# ---------------------------------------------------------------- encoder / decoder

class AceEncoder(nn.Module):
    """Query tokens -> the S encoder layer outputs stacked (B, S, N, d)."""

    main_input_name = "input_ids"

    def __init__(self, config: AceConfig):
        super().__init__()
        self.config = config
        S, d = config.encoder_layers, config.d_model
        if config.encoder_config is not None:
            from transformers import BertConfig, BertModel
            self.bert = BertModel(BertConfig(**{k: v for k, v in config.encoder_config.items()
                                                if k not in ("architectures", "transformers_version")}),
                                  add_pooling_layer=False)
        else:
            self.bert = None
            self.embed = nn.Embedding(config.query_vocab_size, d, padding_idx=PAD)
            self.pos = nn.Embedding(config.max_query_length, d)
            self.drop = nn.Dropout(config.dropout)
            self.layers = nn.ModuleList(EncoderLayer(d_model=d, n_heads=config.n_heads, ffn_dim=config.ffn_dim,
                                                     dropout=config.dropout) for _ in range(S))
            self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(S))

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> AceEncoderOutput:
        if self.bert is not None:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            layers = torch.stack(out.hidden_states[-self.config.encoder_layers:], dim=1)  # (B, S, N, d)
        else:
            B, N = input_ids.shape
            x = self.drop(self.embed(input_ids) + self.pos(torch.arange(N, device=input_ids.device)))
            mask = attention_mask.bool()[:, None, None, :]                             # (B, 1, 1, N)
            outs = []
            for layer, norm in zip(self.layers, self.norms):
                x = layer(x, mask)
                outs.append(norm(x))
            layers = torch.stack(outs, dim=1)                                          # (B, S, N, d)
        return AceEncoderOutput(last_hidden_state=layers[:, -1], layer_states=layers)


def pooled_query(layer_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean of the last fused encoder layer: (B, S, N, d) -> (B, d). With the
    frozen MiniLM encoder this is the MiniLM sentence embedding (before its L2 normalisation)."""
    m = attention_mask.to(layer_states.dtype)[..., None]                               # (B, N, 1)
    return (layer_states[:, -1] * m).sum(1) / m.sum(1).clamp_min(1.0)


class PrototypeHead(nn.Module):
    """Prototype-aware decoding head (issue 19, lever 3) for the coarse identifier levels.

    Level 0 (k): ``logits[k] += s_0 * cos(P q, prototype[k])``; level 1 (v1 given the decoded k):
    ``logits[v1] += s_1 * cos(P q, prototype[k, v1])``, with q the pooled query (``pooled_query``),
    P a linear map d_model -> D (identity at init when d_model == D), s_l learned (log-space) and the
    prototypes the unit means of the identifier vectors under each prefix (``prefix_prototypes``),
    fixed buffers of size K x D and K x C_1 x D whatever the number of items (a prefix with no item
    has a zero prototype: cosine 0)."""

    def __init__(self, config: AceConfig):
        super().__init__()
        sizes, D = config.level_sizes, config.prototype_dim
        self.levels = config.prototype_levels
        self.offsets = [NUM_SPECIAL + sum(sizes[:i]) for i in range(len(sizes))]
        self.sizes = sizes
        self.proj = nn.Linear(config.d_model, D, bias=False)
        self.log_scale = nn.Parameter(torch.full((self.levels,), math.log(config.prototype_scale)))
        self.register_buffer("level0", torch.zeros(sizes[0], D))
        self.register_buffer("level1", torch.zeros(sizes[0] * sizes[1] if self.levels > 1 else 0, D))

    def cosines(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (B, d) -> (scaled cosines to the level-0 prototypes (B, K), to every (k, v1) (B, K*C_1) or None)."""
        q = F.normalize(self.proj(query.to(self.level0.dtype)), dim=-1)
        scale = self.log_scale.exp()
        c0 = scale[0] * (q @ self.level0.T)
        c1 = scale[1] * (q @ self.level1.T) if self.levels > 1 else None
        return c0, c1

    def bonus(self, query: torch.Tensor, prev_tokens: torch.Tensor, position: int, vocab_size: int, cos=None):
        """Additive logits (B, W, V) for decoding ``position`` after ``prev_tokens`` (B, W); None past the levels.
        ``cos``: ``cosines(query)`` when already computed."""
        if position >= self.levels:
            return None
        B, W = prev_tokens.shape
        c0, c1 = cos if cos is not None else self.cosines(query)
        out = c0.new_zeros(B, W, vocab_size)
        lo = self.offsets[position]
        if position == 0:
            out[:, :, lo:lo + self.sizes[0]] = c0[:, None, :]
        else:
            C = self.sizes[1]
            k = (prev_tokens - self.offsets[0]).clamp(0, self.sizes[0] - 1)                # (B, W)
            cols = k[..., None] * C + torch.arange(C, device=k.device)                     # (B, W, C)
            out[:, :, lo:lo + C] = torch.gather(c1[:, None, :].expand(B, W, -1), 2, cols)
        return out

    def teacher_forcing_bonus(self, query: torch.Tensor, decoder_input_ids: torch.Tensor, vocab_size: int):
        """Additive logits (B, T, V) for a teacher-forced decoder input (B, T)."""
        B, T = decoder_input_ids.shape
        cos = self.cosines(query)
        parts = [self.bonus(query, decoder_input_ids[:, t:t + 1], t, vocab_size, cos) for t in range(min(T, self.levels))]
        if T > len(parts):
            parts.append(parts[0].new_zeros(B, T - len(parts), vocab_size))
        return torch.cat(parts, dim=1)


def prefix_prototypes(codes, vectors, level_sizes: list[int], levels: int):
    """Unit means of ``vectors`` (N, D) under each level-0 code (K, D) and each (k, v1) prefix
    (K*C_1, D, row k*C_1 + v1; zero rows for prefixes without items) from ``codes`` (N, L)."""
    import numpy as np

    codes, vectors = np.asarray(codes), np.asarray(vectors, dtype=np.float64)
    if codes.ndim != 2 or vectors.ndim != 2 or codes.shape[0] != vectors.shape[0]:
        raise ValueError(f"codes {codes.shape} and vectors {vectors.shape} must be 2-D with one row per item")
    if codes.shape[0] == 0:
        raise ValueError("no items to build prototypes from")
    if not np.isfinite(vectors).all():
        raise ValueError("prototype vectors contain NaN or inf")
    K, D = level_sizes[0], vectors.shape[1]
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def means(index, n):
        total = np.zeros((n, D))
        np.add.at(total, index, unit)
        return (total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    level0 = means(codes[:, 0], K)
    level1 = means(codes[:, 0] * level_sizes[1] + codes[:, 1], K * level_sizes[1]) if levels > 1 else None
    return level0, level1


class AceDecoder(nn.Module):
    """Identifier tokens + fused encoder memory -> identifier-token logits."""

    def __init__(self, config: AceConfig):
        super().__init__()
        d = config.d_model
        self.embed = nn.Embedding(config.identifier_vocab_size, d, padding_idx=PAD)
        self.pos = nn.Embedding(config.identifier_length, d)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model=d, n_heads=config.n_heads, ffn_dim=config.ffn_dim, dropout=config.dropout,
                         num_encoder_layers=config.encoder_layers, fusion=config.fusion)
            for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.identifier_vocab_size)
        self.prototypes = PrototypeHead(config) if config.prototype_levels else None

    def _query(self, query):
        if self.prototypes is not None and query is None:
            raise AceInputError("this model has prototype heads: pass query= (pooled_query of the encoder layers)")
        return query

    def memory(self, layer_states: torch.Tensor) -> list:
        """Encoder layers (B, S, N, d) -> every decoder layer's cross-attention keys/values (once per query)."""
        return [layer.cross.memory(layer_states) for layer in self.layers]

    def forward(self, decoder_input_ids, memory, mask, query=None):
        """decoder_input_ids (B, T) -> logits (B, T, V_id); teacher forcing, causal. ``query`` (B, d):
        the pooled query, needed by the prototype heads (``model.prototype_levels`` > 0)."""
        T = decoder_input_ids.shape[1]
        x = self.drop(self.embed(decoder_input_ids) + self.pos(torch.arange(T, device=decoder_input_ids.device)))
        for layer, mem in zip(self.layers, memory):
            x, _ = layer(x, mem, mask)
        logits = self.head(self.norm(x))
        if self.prototypes is not None:
            logits = logits + self.prototypes.teacher_forcing_bonus(self._query(query), decoder_input_ids,
                                                                    logits.shape[-1]).to(logits.dtype)
        return logits

    def step(self, tokens, position: int, memory, mask, cache, query=None):
        """tokens (B, W) at ``position`` for W beams per query -> logits (B, W, V_id), new cache.

        ``cache`` is a list (one per layer) of (k, v) (B*W, H, position, dh), or [] at position 0;
        ``query`` (B, d) as in ``forward``."""
        x = self.drop(self.embed(tokens) + self.pos.weight[position])                   # (B, W, d)
        new_cache = []
        for i, (layer, mem) in enumerate(zip(self.layers, memory)):
            x, c = layer(x, mem, mask, cache=cache[i] if cache else ())
            new_cache.append(c)
        logits = self.head(self.norm(x))
        if self.prototypes is not None:
            extra = self.prototypes.bonus(self._query(query), tokens, position, logits.shape[-1])
            if extra is not None:
                logits = logits + extra.to(logits.dtype)
        return logits, new_cache


# ---------------------------------------------------------------- the model

def _stack(x, times: int):
    """Tensor (or nested list/tuple of tensors) -> each tensor repeated ``times`` along dim 0; None stays."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return type(x)(_stack(t, times) for t in x)
    return x.repeat(times, *([1] * (x.dim() - 1)))


class AcePreTrainedModel(PreTrainedModel):
    config_class = AceConfig
    base_model_prefix = "ace"
    main_input_name = "input_ids"
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Xavier-uniform for linear maps and embeddings, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.xavier_uniform_(module.weight)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class AceModel(AcePreTrainedModel, GenerationMixin):
    """Generative retrieval model: query -> identifier-token logits; works with HF ``generate``."""

    def __init__(self, config: AceConfig):
        super().__init__(config)
        self.encoder = AceEncoder(config)
        self.decoder = AceDecoder(config)
        self.post_init()
        if config.pretrained_encoder and self.encoder.bert is not None \
                and next(self.parameters()).device.type != "meta":
            self.load_pretrained_encoder(config.pretrained_encoder)

    def load_pretrained_encoder(self, path: str) -> None:
        """Copy the weights of a BERT-style encoder folder into the encoder (architecture must match)."""
        from transformers import AutoModel
        src = AutoModel.from_pretrained(path)
        missing, unexpected = self.encoder.bert.load_state_dict(src.state_dict(), strict=False)
        kept = self.encoder.bert.config.num_hidden_layers  # pretrained_encoder_layers drops the layers above
        dropped = tuple(f"encoder.layer.{i}." for i in range(kept, src.config.num_hidden_layers))
        missing = [k for k in missing if "pooler" not in k]
        unexpected = [k for k in unexpected if "pooler" not in k and not k.startswith(dropped)]
        if missing or unexpected:
            raise ValueError(f"pretrained encoder {path} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def freeze_encoder(self) -> None:
        """Train the decoder only: encoder weights fixed and its dropout off (kept so by ``train()``)."""
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self._encoder_frozen = True
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_encoder_frozen", False):
            self.encoder.eval()
        return self

    @torch.no_grad()
    def init_identifier_embeddings(self, level_vectors, *, seed: int = 0) -> None:
        """Initialise the identifier-token embeddings of level l from ``level_vectors[l]`` (C_l, D_l)
        (K-Means centroids, RQ-VAE codebooks; None = keep), projected to d_model by PCA (random
        Gaussian projection when D_l < d_model) and scaled to the current embedding norm."""
        sizes, d = self.config.level_sizes, self.config.d_model
        if len(level_vectors) > len(sizes):
            raise ValueError(f"got vectors for {len(level_vectors)} levels, identifiers have {len(sizes)}")
        weight = self.decoder.embed.weight
        gen = torch.Generator().manual_seed(seed)
        offset = NUM_SPECIAL
        for level, (size, vecs) in enumerate(zip(sizes, list(level_vectors) + [None] * len(sizes))):
            if vecs is not None:
                v = torch.as_tensor(vecs, dtype=torch.float32)
                if v.dim() != 2 or v.shape[0] != size:
                    raise ValueError(f"level {level} vectors must have shape ({size}, D), got {tuple(v.shape)}")
                if not torch.isfinite(v).all():
                    raise ValueError(f"level {level} vectors contain NaN or inf")
                v = v - v.mean(0)
                if v.shape[1] >= d and v.shape[0] >= d:
                    proj = torch.linalg.svd(v, full_matrices=False).Vh[:d].T           # (D, d) PCA
                else:
                    proj = torch.randn(v.shape[1], d, generator=gen) / v.shape[1] ** 0.5
                e = v @ proj                                                            # (C, d)
                cur = weight[offset:offset + size]
                e = e / e.norm(dim=1, keepdim=True).mean().clamp_min(1e-8) * cur.norm(dim=1).mean()
                weight[offset:offset + size] = e.to(weight.dtype)
            offset += size

    @torch.no_grad()
    def init_prototype_heads(self, codes, vectors) -> None:
        """Fill the prototype heads (``prototype_levels`` > 0) from the items' identifiers ``codes``
        (N, L) and the vectors they were built from (N, prototype_dim), and initialise them so that
        the untrained model ranks the coarse levels like a dense search of the pooled query over the
        prototypes: P = identity (d_model == D; a random map otherwise), s = prototype_scale, and the
        output head's rows of those levels zero."""
        head = self.decoder.prototypes
        if head is None:
            raise ValueError("this model has no prototype heads (prototype_levels=0)")
        import numpy as np

        codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
        sizes = self.config.level_sizes
        if codes.ndim != 2 or codes.shape[1] != len(sizes):
            raise ValueError(f"codes must have shape (N, {len(sizes)}), got {tuple(codes.shape)}")
        if getattr(vectors, "ndim", 0) != 2 or vectors.shape[1] != self.config.prototype_dim:
            raise ValueError(f"prototype vectors must have shape (N, prototype_dim={self.config.prototype_dim}), "
                             f"got {tuple(getattr(vectors, 'shape', ()))}")
        if (codes[:, :2] < 0).any() or (codes[:, 0] >= sizes[0]).any() or (codes[:, 1] >= sizes[1]).any():
            raise ValueError("codes out of range of the model's level sizes")
        level0, level1 = prefix_prototypes(codes, vectors, sizes, head.levels)
        head.level0.copy_(torch.from_numpy(level0))
        if level1 is not None:
            head.level1.copy_(torch.from_numpy(level1))
        if head.proj.weight.shape[0] == head.proj.weight.shape[1]:
            head.proj.weight.copy_(torch.eye(head.proj.weight.shape[0]))
        head.log_scale.fill_(math.log(self.config.prototype_scale))
        for level in range(head.levels):
            lo = head.offsets[level]
            self.decoder.head.weight[lo:lo + sizes[level]] = 0
            self.decoder.head.bias[lo:lo + sizes[level]] = 0

    def prototype_query(self, layer_states, attention_mask):
        """The pooled query of the prototype heads (B, d), or None when the model has none."""
        return pooled_query(layer_states, attention_mask) if self.decoder.prototypes is not None else None

    @property
    def identifier_vocab_size(self) -> int:
        return self.config.identifier_vocab_size

    def get_encoder(self):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    # -------- input checks
    def check_query_inputs(self, input_ids, attention_mask):
        """Clear errors for wrong shapes/dtypes/values of the query tensors."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise AceInputError(f"input_ids must be a 2-D tensor (batch, length), got "
                                f"{getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise AceInputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        B, N = input_ids.shape
        if B == 0 or N == 0:
            raise AceInputError(f"empty query batch: input_ids has shape {tuple(input_ids.shape)}")
        if N > self.config.max_query_length:
            raise AceInputError(f"query length {N} exceeds max_query_length={self.config.max_query_length}; "
                                f"tokenize with max_length={self.config.max_query_length}")
        if attention_mask is None:
            raise AceInputError("attention_mask is required (1 = real token, 0 = padding)")
        if attention_mask.shape != input_ids.shape:
            raise AceInputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise AceInputError("a query has no tokens (attention_mask row is all zero): empty query")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.query_vocab_size:
            raise AceInputError(f"query token ids must be in [0, {self.config.query_vocab_size}), got [{lo}, {hi}]")

    def check_decoder_inputs(self, decoder_input_ids):
        if not isinstance(decoder_input_ids, torch.Tensor) or decoder_input_ids.dim() != 2:
            raise AceInputError(f"decoder_input_ids must be a 2-D tensor (batch, T), got "
                                f"{getattr(decoder_input_ids, 'shape', type(decoder_input_ids))}")
        T = decoder_input_ids.shape[1]
        if not 1 <= T <= self.config.identifier_length:
            raise AceInputError(f"decoder_input_ids length {T} must be in [1, {self.config.identifier_length}] "
                                f"(identifier length)")
        lo, hi = int(decoder_input_ids.min()), int(decoder_input_ids.max())
        if lo < 0 or hi >= self.identifier_vocab_size:
            raise AceInputError(f"identifier token ids must be in [0, {self.identifier_vocab_size}), got [{lo}, {hi}]")

    # -------- forward
    def encode(self, input_ids, attention_mask) -> torch.Tensor:
        """Checked encoder pass: (B, N) -> encoder layers (B, S, N, d)."""
        self.check_query_inputs(input_ids, attention_mask)
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).layer_states

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, labels=None,
                encoder_outputs=None, return_dict=None, num_passes: int = 1, **kwargs) -> Seq2SeqLMOutput:
        """(B, N) query + (B, T) decoder input -> logits (B, T, V_id); CE loss when labels (B, T) given.

        ``num_passes`` = P > 1 (R-Drop) returns (P*B, T, V_id): the batch stacked P times, each copy with its
        own dropout masks. A frozen encoder and the cross-attention keys/values have no dropout, so they are
        computed once and shared by the P copies; a trained encoder runs on the stacked batch (own masks)."""
        if num_passes < 1:
            raise AceInputError(f"num_passes must be >= 1, got {num_passes}")
        share = num_passes > 1 and (encoder_outputs is not None or getattr(self, "_encoder_frozen", False))
        if num_passes > 1 and not share:  # the encoder's dropout must differ between the passes
            input_ids, attention_mask = _stack(input_ids, num_passes), _stack(attention_mask, num_passes)
            decoder_input_ids, labels = _stack(decoder_input_ids, num_passes), _stack(labels, num_passes)
            num_passes = 1
        if encoder_outputs is None:
            if input_ids is None:
                raise AceInputError("pass input_ids (or encoder_outputs)")
            self.check_query_inputs(input_ids, attention_mask)
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        elif attention_mask is None:
            raise AceInputError("attention_mask is required together with encoder_outputs")
        if decoder_input_ids is None:
            if labels is None:
                raise AceInputError("pass decoder_input_ids or labels")
            bos = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
            decoder_input_ids = torch.cat([bos, labels[:, :-1].clamp_min(0)], dim=1)
        self.check_decoder_inputs(decoder_input_ids)
        layer_states = encoder_outputs.layer_states
        if decoder_input_ids.shape[0] != layer_states.shape[0]:
            raise AceInputError(f"batch size of decoder_input_ids ({decoder_input_ids.shape[0]}) != queries "
                                f"({layer_states.shape[0]})")
        mask = attention_mask.bool()[:, None, None, :]                                  # (B, 1, 1, N)
        memory = self.decoder.memory(layer_states)
        query = self.prototype_query(layer_states, attention_mask)
        if num_passes > 1:  # shared keys/values: repeat's backward sums the passes' gradients
            memory, mask = _stack(memory, num_passes), _stack(mask, num_passes)        # P*B rows
            decoder_input_ids, labels = _stack(decoder_input_ids, num_passes), _stack(labels, num_passes)
            query = _stack(query, num_passes)
        logits = self.decoder(decoder_input_ids, memory, mask, query=query)            # (P*B, T, V_id)
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise AceInputError(f"labels shape {tuple(labels.shape)} != decoder_input_ids shape "
                                    f"{tuple(decoder_input_ids.shape)}")
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=encoder_outputs.last_hidden_state)

    def prepare_inputs_for_generation(self, input_ids, encoder_outputs=None, attention_mask=None, **kwargs):
        """HF generate hook (no cache): the whole decoder prefix is re-run every step."""
        return {"decoder_input_ids": input_ids, "encoder_outputs": encoder_outputs, "attention_mask": attention_mask}
