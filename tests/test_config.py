from dataclasses import dataclass, field

import pytest

from ace.config import ConfigError, config_hash, load_config, parse_overrides, to_dict


@dataclass
class Inner:
    K: int = 128
    lr: float = 1e-4
    hidden: tuple[int, ...] = (512, 256, 128)


@dataclass
class Outer:
    name: str = "demo"
    fusion: bool = True
    inner: Inner = field(default_factory=Inner)
    note: str | None = None


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  K: 64\n")
    cfg = load_config(Outer, p, ["inner.lr=3e-4", "fusion=false", "inner.hidden=[8,4]"])
    assert cfg.name == "x" and cfg.inner.K == 64 and cfg.inner.lr == pytest.approx(3e-4)
    assert cfg.fusion is False and cfg.inner.hidden == (8, 4)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="inner.KK"):
        load_config(Outer, None, ["inner.KK=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="inner.K"):
        load_config(Outer, None, ["inner.K=abc"])
    with pytest.raises(ConfigError, match="fusion"):
        load_config(Outer, None, ["fusion=maybe"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)


def test_hash_tracks_content():
    a, b = Outer(), Outer()
    assert config_hash(a) == config_hash(b)
    b.inner.K = 7
    assert config_hash(a) != config_hash(b)
    assert to_dict(b)["inner"]["K"] == 7
