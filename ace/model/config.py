"""The model's configuration: ``AceConfig`` (the sizes of AceModel, saved with every model) and the run
config's ``model:`` section derived from it.

``ModelSection`` is not a second list of fields: it is built from ``ARCH_FIELDS`` of ``AceConfig`` (same
names, types and defaults) plus two pipeline-only fields: ``query_tokenizer_type`` (unigram | bpe, for
a SentencePiece query tokenizer when there is no pretrained encoder) and ``init_identifier_embeddings``
(identifier-token embeddings from the centroids / codebooks). ``pretrained_encoder`` in a run config
may also be "minilm" (the offline default); ``ace_model_config`` resolves it to a folder.
``max_query_length`` lives here only: the tokenizers and the training loop read the model's.
"""
from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from ace.model.tokens import BOS, EOS, NUM_SPECIAL, PAD


@strict
class AceConfig(PretrainedConfig):
    """Sizes of AceModel; defaults are a CPU-friendly model (d 256, 4 heads, 3+3 layers)."""

    model_type = "ace"

    d_model: int = 256
    n_heads: int = 4
    encoder_layers: int = 3          # S: number of encoder layers fused into every decoder layer
    decoder_layers: int = 3
    ffn_dim: int = 1024
    dropout: float = 0.1
    query_vocab_size: int = 8000
    max_query_length: int = 32
    level_sizes: list[int] | None = None   # identifier [K, C_1..C_M, U]; default [128, 128, 128, 32]
    fusion: bool = True                    # False: plain cross-attention to the last encoder layer
    pretrained_encoder: str | None = None  # local folder of a BERT-style encoder (optional)
    encoder_config: dict | None = None     # its architecture (filled from pretrained_encoder)
    pretrained_encoder_layers: int | None = None  # keep only its first n layers (None: all); a cheaper encoder
    prototype_levels: int = 0              # prototype-aware heads on the first 0, 1 (k) or 2 (k, v1) levels
    prototype_dim: int = 0                 # D of the prototype vectors (the identifier space), needed when on
    prototype_scale: float = 20.0          # initial s of logits += s * cos(P(query), prototype)
    pad_token_id: int | None = PAD
    bos_token_id: int | None = BOS
    eos_token_id: int | None = EOS
    decoder_start_token_id: int | None = BOS
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        if self.level_sizes is None:
            self.level_sizes = [128, 128, 128, 32]
        self.level_sizes = [int(s) for s in self.level_sizes]
        if any(s < 1 for s in self.level_sizes):
            raise ValueError(f"level_sizes must be positive, got {self.level_sizes}")
        for name in ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ffn_dim", "query_vocab_size",
                     "max_query_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"AceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.prototype_levels <= min(2, len(self.level_sizes) - 1):
            raise ValueError(f"prototype_levels must be 0, 1 (k) or 2 (k, v1) and below the identifier length, "
                             f"got {self.prototype_levels}")
        if self.prototype_levels and (self.prototype_dim < 1 or not self.prototype_scale > 0):
            raise ValueError(f"prototype heads need prototype_dim >= 1 and prototype_scale > 0, got "
                             f"{self.prototype_dim} and {self.prototype_scale}")
        if self.pretrained_encoder_layers is not None and not self.pretrained_encoder:
            raise ValueError("pretrained_encoder_layers needs a pretrained_encoder")
        if self.pretrained_encoder and self.encoder_config is None:
            from transformers import AutoConfig
            enc = AutoConfig.from_pretrained(self.pretrained_encoder)
            self.encoder_config = enc.to_dict()
            if self.pretrained_encoder_layers is not None:
                if not 1 <= self.pretrained_encoder_layers <= enc.num_hidden_layers:
                    raise ValueError(f"pretrained_encoder_layers={self.pretrained_encoder_layers} must be in "
                                     f"[1, {enc.num_hidden_layers}] (the pretrained encoder's layers)")
                self.encoder_config["num_hidden_layers"] = int(self.pretrained_encoder_layers)
        if self.encoder_config is not None:
            hidden, layers = self.encoder_config["hidden_size"], self.encoder_config["num_hidden_layers"]
            if hidden != self.d_model:
                raise ValueError(f"pretrained encoder hidden size is {hidden}; set d_model={hidden}")
            if self.encoder_layers > layers:
                raise ValueError(f"encoder_layers={self.encoder_layers} > the pretrained encoder's {layers} layers")
            self.query_vocab_size = int(self.encoder_config["vocab_size"])
            self.max_query_length = min(self.max_query_length, int(self.encoder_config["max_position_embeddings"]))
        super().__post_init__(**kwargs)

    @property
    def identifier_length(self) -> int:
        return len(self.level_sizes)

    @property
    def identifier_vocab_size(self) -> int:
        return NUM_SPECIAL + sum(self.level_sizes)


# the run config's model section, in this order: AceConfig fields (same names, types, defaults) and two
# pipeline-only ones; the identifier levels and prototype_dim come from the identifiers stage
SECTION_FIELDS = ("d_model", "n_heads", "encoder_layers", "decoder_layers", "ffn_dim", "dropout", "max_query_length",
                  "fusion", "pretrained_encoder", "pretrained_encoder_layers", "query_vocab_size",
                  "query_tokenizer_type", "init_identifier_embeddings", "prototype_levels", "prototype_scale")
PIPELINE_ONLY = {"query_tokenizer_type": (str, "unigram"),       # unigram | bpe (SentencePiece, no pretrained encoder)
                 "init_identifier_embeddings": (bool, False)}  # identifier-token embeddings from centroids/codebooks
ARCH_FIELDS = tuple(name for name in SECTION_FIELDS if name not in PIPELINE_ONLY)
_TYPES = {name: eval(AceConfig.__annotations__[name], {}) for name in ARCH_FIELDS}  # "int | None" -> int | None
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [(name, *PIPELINE_ONLY[name][:1], dataclasses.field(default=PIPELINE_ONLY[name][1])) if name in PIPELINE_ONLY
     else (name, _TYPES[name], dataclasses.field(default=getattr(AceConfig, name))) for name in SECTION_FIELDS])
ModelSection.__module__ = __name__
ModelSection.__doc__ = "The run config's ``model:`` section: AceConfig's ARCH_FIELDS + the PIPELINE_ONLY fields."


def ace_model_config(m, level_sizes: list[int], prototype_dim: int = 0) -> tuple[AceConfig, str | None]:
    """(AceConfig, pretrained encoder folder or None) for a run config's model section;
    ``prototype_dim``: dimension of the identifier vectors (prototype heads)."""
    from ace.data.encoders import resolve_text_model

    kw = {name: getattr(m, name) for name in ARCH_FIELDS if name not in ("pretrained_encoder", "query_vocab_size")}
    enc = resolve_text_model(m.pretrained_encoder) if m.pretrained_encoder else None
    return AceConfig(**kw, level_sizes=list(level_sizes), pretrained_encoder=enc, query_vocab_size=m.query_vocab_size,
                     prototype_dim=prototype_dim if m.prototype_levels else 0), enc
