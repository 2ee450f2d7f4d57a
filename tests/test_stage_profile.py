"""ace.bench profile: per-stage times of ACE search (tiny shape, random identifiers, no DT)."""
import json

from ace.bench.__main__ import main as bench_main
from ace.bench.stage_profile import StageClock

TINY = "t=d_model=32,n_heads=2,encoder_layers=1,decoder_layers=1,ffn_dim=64"


def test_profile_cli_splits_ace_search_into_stages(tmp_path):
    (tmp_path / "q.txt").write_text("\n".join(f"a {c} dog on the {p}" for c in ("red", "blue") for p in ("beach", "snow")))
    rc = bench_main(["profile", "--out", str(tmp_path / "o"), "--sizes", "300", "--dim", "16", "--ace", TINY,
                     "--precisions", "fp32", "--dt", "--identifiers", "random", "--id", "K=16", "codebook_size=16",
                     "max_u=8", "--hybrid-beams", "7", "--batch", "8", "--num-batches", "1", "--repeats", "1", "--queries", str(tmp_path / "q.txt")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "profile.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["t-fp32 pure", "t-fp32 hybrid"]
    pure, hybrid = res["rows"]
    steps = [k for k in pure["stages"] if k.startswith("decoder step")]
    assert sorted(steps) == [f"decoder step {d}" for d in range(1, 5)]           # L = 4 levels (k, v1, v2, u)
    for k in ("tokenise", "encode", "decoder memory", "beam bookkeeping"):
        assert pure["stages"][k] >= 0
    assert pure["stages"]["encode"] > 0 and abs(pure["total_ms"] - sum(pure["stages"].values())) < 1e-6
    assert "re-rank" in hybrid["stages"] and "re-rank" not in pure["stages"]
    assert pure["beams"] == 5 and hybrid["beams"] == 7                         # --hybrid-beams: the top-B it re-ranks
    assert "ms/query" in (tmp_path / "o" / "profile.md").read_text()


def test_stage_clock_wraps_and_restores():
    class Thing:
        def f(self, x):
            return x + 1

    t = Thing()
    clock = StageClock()
    clock.wrap(t, "f", lambda a: f"f{a[0]}")
    assert t.f(1) == 2 and t.f(2) == 3
    assert set(clock.seconds) == {"f1", "f2"}
    clock.unwrap()
    assert "f" not in vars(t) and t.f(5) == 6


def test_profile_bad_flag_is_a_clear_error(tmp_path, capsys):
    rc = bench_main(["profile", "--out", str(tmp_path), "--sizes", "0", "--ace", TINY, "--dt"])
    assert rc == 2 and "sizes" in capsys.readouterr().err
    rc = bench_main(["profile", "--out", str(tmp_path), "--hybrid-beams", "0", "--ace", TINY, "--dt"])
    assert rc == 2 and "--hybrid-beams" in capsys.readouterr().err
