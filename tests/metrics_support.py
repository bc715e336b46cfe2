"""Helpers shared by the metrics tests: a tiny random CLIP saved to disk and small image folders."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image


def build_tiny_clip(path: Path, projection_dim: int = 768, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` (32x32 images, 32-d towers, ``projection_dim``-d joint
    space) with its tokenizer and image processor to ``path``; load it with ``from_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from psalign.testing import build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return Path(path)


def write_images(
    folder: Path, count: int, size: int = 40, seed: int = 0, prefix: str = "img", ext: str = ".png"
) -> list[Path]:
    """``count`` random RGB images ``<prefix>_<i><ext>`` in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{prefix}_{index:03d}{ext}"
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def chat_completion(content: str) -> dict:
    """An OpenAI chat-completions response body whose message is ``content``."""
    message = {"role": "assistant", "content": content}
    return {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}


class FakeChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 for tests.

    ``respond(request_json) -> (status, body)`` makes each reply (``body`` a dict is sent as JSON).
    Every request body is kept in ``requests``. It answers at most ``max_requests`` requests (503
    after that), and shuts itself down after ``lifetime_s`` seconds even if the test never closes it.
    """

    def __init__(
        self, respond: Callable[[dict], tuple[int, object]], max_requests: int = 200, lifetime_s: float = 60.0
    ):
        self.respond = respond
        self.max_requests = max_requests
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if self.path != "/v1/chat/completions":
                    status, reply = 404, {"error": "not found"}
                elif len(server.requests) > server.max_requests:
                    status, reply = 503, {"error": "request budget of the fake server spent"}
                else:
                    status, reply = server.respond(body)
                data = (json.dumps(reply) if not isinstance(reply, str) else reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.watchdog = threading.Timer(lifetime_s, self.httpd.shutdown)
        self.watchdog.daemon = True

    def __enter__(self) -> "FakeChatServer":
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def request_images(body: dict) -> list[str]:
    """The image data URLs of a chat request, in the order shown."""
    return [
        part["image_url"]["url"]
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


def request_text(body: dict) -> str:
    """All text of a chat request (system and user turns)."""
    texts = []
    for message in body["messages"]:
        if isinstance(message["content"], str):
            texts.append(message["content"])
        else:
            texts += [part["text"] for part in message["content"] if part["type"] == "text"]
    return "\n".join(texts)
