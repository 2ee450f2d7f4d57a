"""The server over the real ace.serving.retriever.Retriever, loaded from a tiny run folder built in the test.

The run holds a tiny untrained AceModel (random weights): serving must return exactly what the
library call returns, whatever the model's quality, so no training is needed here.
"""
import asyncio
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from ace.config import ServeConfig
from ace.data.corpus import Corpus, CorpusItem
from ace.serving.retriever import Retriever
from ace.serving.server import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ may or may not be a package
from serving_support import png_bytes, running_server, wav_bytes  # noqa: E402


def build_tiny_run(run: Path, media_root: Path, n_items: int = 40) -> list[tuple[str, str]]:
    """Identifiers + query tokenizer + untrained tiny AceModel + corpus, in the run-folder layout."""
    import torch

    from ace.model.modeling import AceModel
    from ace.bench.synthetic import make_synthetic_task, synthetic_model_config
    from ace.model.tokens import IdentifierVocab, QueryTokenizer
    from identifiers.config import IdentifierConfig
    from identifiers.semantic_ids import SemanticIdTokenizer

    task = make_synthetic_task(n_items, dim=32, seed=0)
    id_cfg = IdentifierConfig(K=4, M=1, codebook_size=4, max_u=32, kmeans_n_init=1, kmeans_max_iter=20,
                              hidden_dims=(32,), latent_dim=8, rqvae_max_steps=30, rqvae_batch_size=64,
                              codebook_kmeans_iters=5, seed=0)
    id_tok = SemanticIdTokenizer.fit(task.embeddings, task.item_ids, id_cfg)
    qtok = QueryTokenizer.train([q for q, _ in task.train_pairs], vocab_size=60, max_length=24)
    torch.manual_seed(0)
    model = AceModel(synthetic_model_config(qtok.vocab_size, id_tok.level_sizes, d_model=32, n_heads=2,
                                            encoder_layers=1, decoder_layers=1, ffn_dim=64))
    model.save_pretrained(str(run / "model"))
    qtok.save(run / "query_tokenizer")
    IdentifierVocab(id_tok.level_sizes).save(run / "identifier_vocab.json")
    id_tok.save(run / "identifiers")
    media_root.mkdir(parents=True, exist_ok=True)
    items = []
    for i, item_id in enumerate(task.item_ids):
        if i % 2 == 0:
            (media_root / f"{item_id}.png").write_bytes(png_bytes((i * 5 % 255, 10, 10)))
            items.append(CorpusItem(item_id, "image", media=f"{item_id}.png", captions=[" ".join(task.attributes[i])]))
        else:
            (media_root / f"{item_id}.wav").write_bytes(wav_bytes(0.05))
            items.append(CorpusItem(item_id, "audio", media=f"{item_id}.wav", captions=[" ".join(task.attributes[i])]))
    Corpus(items, root=media_root).save_jsonl(run / "corpus.jsonl")
    (run / "corpus_root.json").write_text(json.dumps({"root": str(media_root)}))
    return task.val_pairs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tinyrun")
    queries = build_tiny_run(base / "run", base / "media")
    retriever = Retriever.from_run(base / "run", device="cpu")
    return retriever, [q for q, _ in queries], base / "media"


def _rows(hits):
    return [(h.item_id, h.modality, h.score, list(h.identifier), h.source) for h in hits]


def _json_rows(results):
    return [(h["item_id"], h["modality"], h["score"], h["identifier"], h["source"]) for h in results]


def test_served_results_equal_library_call(tiny):
    retriever, queries, media_root = tiny
    app = create_app(retriever, ServeConfig(max_wait_ms=1.0))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        for q, k, modality in [(queries[0], 5, None), (queries[1], 3, "image"), (queries[2], 10, "audio"),
                               (queries[3], 1, None)]:
            body = {"query": q, "k": k, **({"modality": modality} if modality else {})}
            r = c.post("/search", json=body)
            assert r.status_code == 200, r.text
            expected = retriever.search([q], k=k, modality=modality)[0]
            assert _json_rows(r.json()["results"]) == _rows(expected)  # a lone query: the very same call
            assert len(expected) == k
            if modality:
                assert {h["modality"] for h in r.json()["results"]} == {modality}
        hit = c.post("/search", json={"query": queries[0], "k": 1, "modality": "image"}).json()["results"][0]
        media = c.get(hit["media_url"])
        assert media.status_code == 200 and media.headers["content-type"] == "image/png"
        assert media.content == (media_root / f"{hit['item_id']}.png").read_bytes()
        assert c.get(f"/items/{hit['item_id']}").json()["modality"] == "image"
        assert c.get("/items/not-an-item").status_code == 404
        no_video = c.post("/search", json={"query": queries[0], "modality": "video"})  # no video items: no hits
        assert no_video.status_code == 200 and no_video.json()["results"] == []
        stats = c.get("/stats").json()
        assert stats["items"] == 40 and stats["queries_served"] >= 5


def test_concurrent_batched_results_equal_batched_library_call(tiny):
    retriever, queries, _ = tiny
    qs = queries[:12]
    app = create_app(retriever, ServeConfig(max_batch=16, max_wait_ms=200.0))

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/search", json={"query": q, "k": 5}) for q in qs))

    with running_server(app) as url:
        responses = asyncio.run(fire(url))
        batches = httpx.get(url + "/stats").json()["batches"]
    assert batches["max_size"] > 1, batches
    single = retriever.search(qs, k=5)  # one library call over the whole batch
    for r, hits in zip(responses, single):
        assert r.status_code == 200
        got = _json_rows(r.json()["results"])
        assert [g[0] for g in got] == [h.item_id for h in hits]
        np.testing.assert_allclose([g[2] for g in got], [h.score for h in hits], rtol=1e-4, atol=1e-5)
