"""Shared by the server tests: a deterministic retriever, a tiny media corpus, a real uvicorn server in a thread.

``TokenOverlapRetriever`` satisfies the Retriever protocol (search / item / info) with a fixed,
exactly reproducible ranking (caption word overlap, ties by item id), so HTTP mechanics
(limits, errors, media, micro-batching) can be tested without a trained model.
"""
from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import uvicorn
from PIL import Image

from ace.data.corpus import CorpusItem


@dataclass
class Hit:
    item_id: str
    modality: str
    score: float
    identifier: tuple[int, ...]
    source: str = "generative"


class TokenOverlapRetriever:
    """Ranks items by how many query words occur in their captions; records every search call."""

    def __init__(self, items: list[CorpusItem], *, root: Path | None = None, delay_s: float = 0.0):
        self.items = {it.item_id: it for it in items}
        self.order = [it.item_id for it in items]
        self.corpus_root = root
        self.delay_s = delay_s
        self.calls: list[int] = []  # batch size of each search call
        self.lock = threading.Lock()

    def identifier(self, item_id: str) -> tuple[int, ...]:
        i = self.order.index(item_id)
        return (i % 4, i // 4, 0)

    def search(self, queries, k=10, num_beams=None, modality=None):
        if num_beams is not None and num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        with self.lock:
            self.calls.append(len(queries))
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for q in queries:
            if "BOOM" in q:
                raise ValueError(f"query rejected by the retriever: {q!r}")
            words = set(re.findall(r"\w+", q.lower()))
            scored = []
            for item_id in self.order:
                it = self.items[item_id]
                if modality is not None and it.modality != modality:
                    continue
                cap = set(re.findall(r"\w+", " ".join(it.captions).lower()))
                scored.append((-len(words & cap), item_id))
            scored.sort()
            out.append([Hit(item_id, self.items[item_id].modality, float(-neg) - 0.01 * rank,
                            self.identifier(item_id)) for rank, (neg, item_id) in enumerate(scored[:k])])
        return out

    def item(self, item_id: str) -> CorpusItem:
        try:
            return self.items[item_id]
        except KeyError:
            raise KeyError(f"unknown item id: {item_id!r}") from None

    def info(self) -> dict:
        return {"items": len(self.items), "model_version": "token-overlap-test", "identifier_version": 1}


def png_bytes(color=(200, 30, 30), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 0.2, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def media_corpus(tmp: Path) -> tuple[Path, list[CorpusItem], Path]:
    """A corpus root with real image/audio files, plus items whose media escape the root.

    Returns (root, items, secret) where ``secret`` is a file outside the root that must never be served.
    """
    root = tmp / "corpus"
    (root / "img").mkdir(parents=True)
    (root / "aud").mkdir()
    (root / "vid").mkdir()
    secret = tmp / "secret.txt"
    secret.write_text("TOP SECRET")
    (root / "img" / "red.png").write_bytes(png_bytes((220, 20, 20)))
    (root / "img" / "blue.png").write_bytes(png_bytes((20, 20, 220)))
    (root / "aud" / "bark.wav").write_bytes(wav_bytes())
    (root / "vid" / "surf.webm").write_bytes(b"\x1a\x45\xdf\xa3" + b"\0" * 60)  # tiny placeholder container
    (root / "link_out.png").symlink_to(secret)
    (root / "link_in.png").symlink_to(root / "img" / "red.png")
    items = [
        CorpusItem("img/red", "image", media="img/red.png", captions=["a red square on a table", "red box"]),
        CorpusItem("img/blue", "image", media=str(root / "img" / "blue.png"), captions=["a blue square in the sky"]),
        CorpusItem("aud/bark", "audio", media="aud/bark.wav", captions=["a dog barks twice"]),
        CorpusItem("vid/surf", "video", media="vid/surf.webm", captions=["a man surfs a big wave"]),
        CorpusItem("txt/poem", "text", captions=["a short poem about the sea"]),
        CorpusItem("img/link_in", "image", media="link_in.png", captions=["red square again via a link"]),
        CorpusItem("evil/dotdot", "image", media="../secret.txt", captions=["escape with dot dot"]),
        CorpusItem("evil/abs", "image", media=str(secret), captions=["escape with an absolute path"]),
        CorpusItem("evil/symlink", "image", media="link_out.png", captions=["escape with a symlink"]),
        CorpusItem("img/missing", "image", media="img/nothing.png", captions=["a missing file"]),
    ]
    return root, items, secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, *, timeout: float = 20.0):
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL; stops it after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def stream_until_killed(client, batches, killer, *, headers: dict, kill_after: int = 3,
                        on_ack=None) -> tuple[list[int], list[int]]:
    """POST /items the batches ``batches(n)`` (n = 0, 1, ...) back to back until the connection drops; ``killer``
    (a threading.Timer that kills the server) starts once ``kill_after`` batches are acknowledged, so the kill
    lands while later batches stream in. ``on_ack(response)`` sees every 201. Returns (acked, sent) batch numbers."""
    import httpx

    acked, sent = [], []
    for n in range(10_000):
        batch = batches(n)
        sent.append(n)
        try:
            res = client.post("/items", headers=headers, json={"items": batch})
        except httpx.TransportError:
            break
        assert res.status_code == 201, res.text
        acked.append(n)
        if on_ack is not None:
            on_ack(res)
        if len(acked) == kill_after:
            killer.start()
    return acked, sent
