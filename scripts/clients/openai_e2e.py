"""Drives a running worker with the official `openai` Python package and checks what it
gets: images equal to diffusers' reference outputs (fixtures/reference/) for the same seed,
steps, sampler and guidance, and each error raised as the client's usual exception.

    sd-worker serve --model fixtures/models/tiny-sd1 --port 8080 --api-key secret &
    /work/venv-clients/bin/python scripts/clients/openai_e2e.py --url http://127.0.0.1:8080/v1 --key secret

Needs `openai`, `numpy`, `safetensors` and `pillow` (pip install openai numpy safetensors
pillow). The requests this client sends are also recorded (record_openai.py) and replayed by
crates/server/tests/openai.rs, so CI needs no Python.
"""

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import openai
from PIL import Image
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "fixtures/reference"


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def check_case(client, case):
    extra = {"seed": case["seed"], "steps": case["steps"], "guidance_scale": case["guidance"]}
    if case["scheduler"]:
        extra["sampler"] = case["scheduler"]
    if case["negative_prompt"]:
        extra["negative_prompt"] = case["negative_prompt"]
    result = client.images.generate(
        model=case["model"],
        prompt=case["prompt"],
        n=case["batch"],
        size=f"{case['width']}x{case['height']}",
        response_format="b64_json",
        extra_body=extra,
    )
    want = load_file(REFERENCE / f"{case['name']}.safetensors")["images"]
    got = np.stack([pixels(d.b64_json) for d in result.data])
    diff = np.abs(got.astype(int) - want.astype(int))
    ok = got.shape == want.shape and diff.max() <= 3 and diff.mean() <= 0.5
    print(f"{case['name']}: max {diff.max()}, mean {diff.mean():.3f} levels: {'ok' if ok else 'FAILED'}")
    return ok


def expect(error, call, what):
    try:
        call()
    except error as e:
        print(f"{what}: {type(e).__name__} ({e.status_code}) ok")
        return True
    except Exception as e:  # noqa: BLE001 - report any other outcome as a failure
        print(f"{what}: FAILED, got {type(e).__name__}: {e}")
        return False
    print(f"{what}: FAILED, no error")
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.key, max_retries=0)
    models = [m.id for m in client.models.list().data]
    print("models:", models)
    cases = json.loads((REFERENCE / "cases.json").read_text())["cases"]
    ours = {"ddim", "pndm", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", None}
    results = [check_case(client, c) for c in cases if c["model"] in models and c["scheduler"] in ours]
    square = (ROOT / "fixtures/inputs/square32.png").read_bytes()
    edit = client.images.edit(image=("square32.png", square, "image/png"), prompt="a hat", size="32x32", extra_body={"steps": 2})
    print("edit without a mask (image-to-image):", len(edit.data), "image")
    results += [
        expect(openai.BadRequestError, lambda: client.images.generate(prompt="a", n=99), "n=99"),
        expect(openai.BadRequestError, lambda: client.images.generate(prompt="a", size="33x33"), "size 33x33"),
        expect(openai.NotFoundError, lambda: client.images.generate(model="dall-e-3", prompt="a"), "model dall-e-3"),
        expect(
            openai.AuthenticationError,
            lambda: openai.OpenAI(base_url=args.url, api_key="wrong", max_retries=0).images.generate(prompt="a"),
            "wrong key",
        ),
    ]
    ok = all(results)
    print(f"{sum(results)}/{len(results)} checks passed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
