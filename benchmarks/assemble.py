"""Join benchmarks/BENCHMARKS_HEAD.md and benchmarks/results/*.md into BENCHMARKS.md (headings demoted)."""
from pathlib import Path

ORDER = ["quality", "ace_proxy", "ace_recipe", "efficiency", "new_items", "new_items_serving", "identifiers", "decoding", "training", "demo", "querygen", "encoders", "fallback", "serving", "replicas"]


def main() -> None:
    here = Path(__file__).resolve().parent
    parts = [(here / "BENCHMARKS_HEAD.md").read_text().rstrip() + "\n"]
    files = {p.stem: p for p in (here / "results").glob("*.md")}
    for name in ORDER + sorted(set(files) - set(ORDER)):
        if name in files:
            text = files[name].read_text().rstrip()
            text = "\n".join(("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines())
            parts.append(text + f"\n\n<sub>source: benchmarks/results/{name}.md</sub>\n")
    (here.parent / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
