"""Drives a running worker with the `webuiapi` package (the most used AUTOMATIC1111 API
client) and checks what it gets: txt2img images equal to diffusers' reference outputs
(fixtures/reference/) for the same seed, steps, sampler and CFG scale, the describing routes,
and each refused field as a 422 naming it.

    sd-worker serve --model fixtures/models/tiny-sd1 --port 8080 --api-key secret &
    /work/venv-clients/bin/python scripts/clients/a1111_e2e.py --port 8080 --key secret

Needs `webuiapi`, `numpy` and `safetensors`. The requests this client sends are also recorded
(record_webuiapi.py) and replayed by crates/server/tests/a1111.rs, so CI needs no Python.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import webuiapi
from PIL import Image
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "fixtures/reference"
# Our sampler names in the reference cases, as A1111 names them (A1111's "DPM++ 2M" runs Karras).
A1111_NAMES = {None: "PLMS", "pndm": "PLMS", "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "dpmpp-2m-karras": "DPM++ 2M Karras"}


def check_case(api, case):
    result = api.txt2img(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"] or "",
        seed=case["seed"],
        steps=case["steps"],
        cfg_scale=case["guidance"],
        width=case["width"],
        height=case["height"],
        sampler_name=A1111_NAMES[case["scheduler"]],
        eta=0.0 if case["scheduler"] == "ddim" else 1.0,
    )
    want = load_file(REFERENCE / f"{case['name']}.safetensors")["images"]
    got = np.stack([np.asarray(im.convert("RGB")) for im in result.images])
    diff = np.abs(got.astype(int) - want.astype(int))
    ok = got.shape == want.shape and diff.max() <= 3 and diff.mean() <= 0.5 and result.info["seed"] == case["seed"]
    print(f"{case['name']}: max {diff.max()}, mean {diff.mean():.3f} levels, info seed {result.info['seed']}: {'ok' if ok else 'FAILED'}")
    return ok


def refused(call, field, what):
    try:
        call()
    except RuntimeError as e:
        status, text = e.args
        detail = json.loads(text)["detail"][0]
        ok = status == 422 and detail["loc"] == ["body", field]
        print(f"{what}: {status} {detail['loc']}: {'ok' if ok else 'FAILED'}")
        return ok
    print(f"{what}: FAILED, no error")
    return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    api = webuiapi.WebUIApi(host="127.0.0.1", port=args.port)
    api.set_auth("user", args.key)
    print("models:", api.util_get_model_names(), "current:", api.util_get_current_model())
    print("samplers:", api.util_get_sampler_names(), "schedulers:", api.util_get_scheduler_names())
    cases = json.loads((REFERENCE / "cases.json").read_text())["cases"]
    results = [
        check_case(api, c)
        for c in cases
        if c["model"] == "tiny-sd1" and c["batch"] == 1 and c["scheduler"] in A1111_NAMES
    ]
    square = Image.open(ROOT / "fixtures/inputs/square32.png")
    r = api.img2img(images=[square], prompt="a cat", denoising_strength=0.5, steps=4, width=32, height=32, seed=3)
    print("img2img:", len(r.images), "image, seeds", r.info["all_seeds"])
    r = api.txt2img(prompt="a cat", steps=2, width=32, height=32, seed=10, batch_size=2, n_iter=2)
    results.append(r.info["all_seeds"] == [10, 11, 12, 13] and len(r.images) == 4)
    print("batch 2 x 2: seeds", r.info["all_seeds"])
    info = api.png_info(r.images[0])
    results.append(info.info.startswith("a cat\nSteps: 2"))
    print("png-info:", repr(info.info[:60]))
    api.util_set_model(api.util_get_model_names()[0])
    print("progress idle:", api.get_progress()["progress"])
    results += [
        refused(lambda: api.txt2img(prompt="a", enable_hr=True, steps=1, width=32, height=32), "enable_hr", "enable_hr"),
        refused(lambda: api.txt2img(prompt="a", restore_faces=True, steps=1, width=32, height=32), "restore_faces", "restore_faces"),
        refused(lambda: api.txt2img(prompt="a", sampler_name="LMS", steps=1, width=32, height=32), "sampler_name", "sampler LMS"),
        refused(lambda: api.img2img(images=[square], mask_image=square, prompt="a", steps=1, width=32, height=32), "mask_blur", "A1111 mask defaults"),
    ]
    print(f"{sum(results)}/{len(results)} checks passed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
