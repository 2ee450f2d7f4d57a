"""One config system for everything: dataclasses loaded from YAML, overridable with `key=value`.

Every component owns a small dataclass (``IdentifierConfig``, ``AceConfig``, ...). This module
turns nested dicts (from YAML) into those dataclasses, applies dotted ``key=value`` overrides
from the command line, and hashes configs so pipeline stages know when their output is stale.

    cfg = load_config(RunConfig, "configs/demo.yaml", ["training.max_steps=200", "identifiers.K=64"])
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise a ConfigError naming ``key``."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict | None, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are an error, not ignored."""
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _coerce(value, types_[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__} config{' at ' + prefix.rstrip('.') if prefix else ''}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain nested dict (YAML/JSON-serialisable)."""
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out, default=str))


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """YAML file (optional) + dotted ``key=value`` overrides -> dataclass ``cls``."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(*parts: Any) -> str:
    """Stable short hash of configs / values, used to decide whether a stage's output is stale."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class StoreConfig:
    """The item store a server reads and writes (ace/serving/store.py, docs/SCALING.md)."""
    url: str | None = None               # sqlite:///path or postgresql://...; None -> $ACE_STORE_URL, else RUN/store.sqlite
    poll_interval_s: float = 0.2         # how often a replica applies other processes' writes (and checks for a fold)
    reload_model: bool = True            # reload the model when train.py fold marks a new one (one replica at a time)

    def __post_init__(self):
        if not self.poll_interval_s > 0:
            raise ValueError(f"store.poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.url is not None and not str(self.url).lower().startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"store.url must start with sqlite:/// or postgresql://, got {str(self.url)[:30]!r}")


@dataclasses.dataclass
class ServeConfig:
    """HTTP serving (ace/serving/server.py): limits, micro-batching, auth. api_key falls back to env ACE_API_KEY."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None           # required by write endpoints; None -> env ACE_API_KEY
    read_requires_key: bool = False      # True: search/items/media/stats also need the key
    max_batch: int = 32                  # micro-batching: most queries in one retriever.search call
    max_wait_ms: float = 5.0             # ... and longest a query waits for others to join its batch
    max_queue: int = 1024                # queued searches beyond this get 503 (load shedding)
    search_timeout_s: float = 60.0       # a search not answered by then gets 504
    max_query_chars: int = 512
    max_k: int = 100
    default_k: int = 10
    max_beams: int = 128
    max_body_bytes: int = 64 * 1024      # request bodies (JSON endpoints)
    max_upload_bytes: int = 64 * 1024 * 1024  # bodies of POST /items (media uploads)
    max_items_per_request: int = 1000    # POST /items: items in one batch
    media_root: str | None = None        # None -> the run's corpus root
    latency_window: int = 10_000         # recent searches kept for /stats percentiles
    result_captions: int = 1             # captions per search result (GET /items/{id} gives all)
    torch_threads: int = 0               # >0: torch.set_num_threads(n) before loading (1 is far faster on a busy CPU)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)  # the item store (shared by replicas)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        if not 1 <= self.default_k <= self.max_k <= 100:
            raise ValueError(f"need 1 <= default_k ({self.default_k}) <= max_k ({self.max_k}) <= 100")
        if self.max_query_chars < 1 or self.max_body_bytes < 1 or self.max_beams < 1 or self.max_items_per_request < 1:
            raise ValueError("max_query_chars, max_beams, max_body_bytes and max_items_per_request must be >= 1")
        if self.result_captions < 0:
            raise ValueError(f"result_captions must be >= 0, got {self.result_captions}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0 = torch's default), got {self.torch_threads}")

    def resolved_api_key(self) -> str | None:
        """The configured key, else $ACE_API_KEY, else None (writes disabled)."""
        import os
        return self.api_key or os.environ.get("ACE_API_KEY") or None
