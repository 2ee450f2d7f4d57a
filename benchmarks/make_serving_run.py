"""A serving-benchmark run with real parts but untrained model weights, for load tests before a trained run exists.

    python benchmarks/make_serving_run.py --from runs/demo --out runs/serving_bench [--config configs/demo_scratch.yaml]

Copies the identifiers, corpus and held-out queries of a run that has reached the identifiers
stage, trains a query tokenizer on the corpus captions, and saves an AceModel of the config's
size with *random* weights. Decoding cost (the serving cost) is the same for trained and
untrained weights of one size - constrained beam search always decodes L tokens over the same
trie - but the rankings are meaningless: figures from such a run are latency/throughput only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ace.run_folder import RunPaths  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", type=Path, required=True, help="run folder with identifiers/ and corpus.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_scratch.yaml",
                   help="run config whose model: section sizes the model (default: the from-scratch demo model the "
                        "serving results were measured with; a pretrained encoder is dropped)")
    args = p.parse_args(argv)

    import torch

    from ace.config import read_yaml
    from ace.data.corpus import load_corpus
    from ace.model.config import AceConfig
    from ace.model.modeling import AceModel
    from ace.model.tokens import IdentifierVocab, QueryTokenizer
    from identifiers.semantic_ids import SemanticIdTokenizer

    src, out = RunPaths(args.src), RunPaths(args.out)
    for need in (RunPaths.IDENTIFIERS, RunPaths.CORPUS):
        if not (src / need).exists():
            raise SystemExit(f"{args.src} has no {need}: run train.py --until identifiers first")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src.identifiers, out.identifiers, dirs_exist_ok=True)
    for name in (RunPaths.CORPUS, RunPaths.CORPUS_ROOT, RunPaths.TEST_QUERIES):
        if (args.src / name).is_file():
            shutil.copy2(args.src / name, args.out / name)

    model_cfg = dict(read_yaml(args.config).get("model", {}))
    vocab_size = int(model_cfg.pop("query_vocab_size", 400))
    for key in ("pretrained_encoder", "query_tokenizer_type"):
        model_cfg.pop(key, None)
    id_tok = SemanticIdTokenizer.load(out.identifiers, device="cpu")
    corpus = load_corpus(out.corpus, validate=False)
    texts = [c for it in corpus.items for c in it.captions]
    qtok = QueryTokenizer.train(texts, vocab_size=vocab_size, max_length=int(model_cfg.get("max_query_length", 32)))
    torch.manual_seed(0)
    model = AceModel(AceConfig(**model_cfg, query_vocab_size=qtok.vocab_size, level_sizes=list(id_tok.level_sizes)))
    model.save_pretrained(str(out.model))
    qtok.save(out.query_tokenizer)
    IdentifierVocab(id_tok.level_sizes).save(out.identifier_vocab)
    (args.out / "UNTRAINED").write_text("model weights are random: latency/throughput benchmarks only\n")
    print(json.dumps({"run": str(args.out), "items": len(corpus), "level_sizes": list(id_tok.level_sizes),
                      "parameters": sum(p.numel() for p in model.parameters())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
