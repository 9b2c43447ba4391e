"""Records the HTTP requests that the official `openai` Python package sends for the Images
API, for crates/server/tests/openai.rs to replay against the worker (so CI needs no Python).

The client is pointed at a local capture server that answers like the API; each request is
written to crates/server/tests/fixtures/openai/<name>.json as {method, path, content_type,
authorization, body_b64}. Run with a venv that has `openai` (pip install openai):

    /work/venv-clients/bin/python scripts/clients/record_openai.py
"""

import json
import struct
import sys
import zlib
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/server/tests/fixtures/openai"
INPUTS = ROOT / "fixtures/inputs"


def png_rgba(width, height, pixel):
    """A PNG with pixel(x, y) -> (r, g, b, a); written by hand so that no imaging library is
    needed."""
    rows = b"".join(
        b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height)
    )

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def hole_mask():
    """32x32: the 16x16 square in the middle is transparent (the area to edit)."""
    return png_rgba(32, 32, lambda x, y: (0, 0, 0, 0 if 8 <= x < 24 and 8 <= y < 24 else 255))


def answer(method, path):
    if method == "GET":
        return {"object": "list", "data": [{"id": "tiny-sd1", "object": "model", "created": 0, "owned_by": "sd-worker"}]}
    return {"created": 0, "data": [{"b64_json": ""}]}


def main():
    server, RECORDED = capture.start(answer)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="secret-token", max_retries=0)
    square = (INPUTS / "square32.png").read_bytes()
    calls = {
        "generations": lambda: client.images.generate(
            model="tiny-sd1",
            prompt="a photo of a cat",
            n=2,
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 42, "steps": 4, "guidance_scale": 6.0, "sampler": "euler", "negative_prompt": "blurry"},
        ),
        "generations_url": lambda: client.images.generate(
            prompt="a photo of a cat", size="32x32", response_format="url", extra_body={"seed": 1, "steps": 2}
        ),
        "generations_jpeg": lambda: client.images.generate(
            prompt="a photo of a cat", size="32x32", output_format="jpeg", output_compression=90, extra_body={"seed": 1, "steps": 2}
        ),
        "edits_mask": lambda: client.images.edit(
            image=("square32.png", square, "image/png"),
            mask=("mask.png", hole_mask(), "image/png"),
            prompt="a red hat",
            size="32x32",
            extra_body={"seed": 7, "steps": 4, "sampler": "euler"},
        ),
        "variations": lambda: client.images.create_variation(
            image=("square32.png", square, "image/png"),
            n=1,
            size="32x32",
            extra_body={"seed": 3, "steps": 4, "strength": 0.5, "sampler": "euler"},
        ),
        "models": lambda: client.models.list(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, call in calls.items():
        del RECORDED[:]
        call()
        (OUT / f"{name}.json").write_text(json.dumps(RECORDED[0], indent=1) + "\n")
        print(name, RECORDED[0]["method"], RECORDED[0]["path"], RECORDED[0]["content_type"], len(RECORDED[0]["body_b64"]))
    server.shutdown()


if __name__ == "__main__":
    main()
