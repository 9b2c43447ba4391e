"""Records the HTTP requests that the `webuiapi` Python package (the most used AUTOMATIC1111
API client) sends, for crates/server/tests/a1111.rs to replay against the worker, so CI needs
no Python. The client is pointed at a local capture server that answers like A1111; each
request is written to crates/server/tests/fixtures/a1111/<name>.json as {method, path,
content_type, authorization, body_b64}.

    /work/venv-clients/bin/python scripts/clients/record_webuiapi.py

Needs `webuiapi` (pip install webuiapi; it brings Pillow).
"""

import base64
import io
import json
import sys
from pathlib import Path

import webuiapi
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capture  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/server/tests/fixtures/a1111"
INPUTS = ROOT / "fixtures/inputs"


def tiny_png():
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


ANSWERS = {
    "/sdapi/v1/txt2img": {"images": [tiny_png()], "parameters": {}, "info": "{}"},
    "/sdapi/v1/img2img": {"images": [tiny_png()], "parameters": {}, "info": "{}"},
    "/sdapi/v1/png-info": {"info": "", "items": {}, "parameters": {}},
    "/sdapi/v1/options": {"sd_model_checkpoint": "tiny-sd1"},
    "/sdapi/v1/sd-models": [{"title": "tiny-sd1", "model_name": "tiny-sd1", "sha256": None}],
    "/sdapi/v1/progress": {"progress": 0.0, "state": {"job_count": 0}},
    "/sdapi/v1/scripts": {"txt2img": [], "img2img": []},
}


def answer(method, path):
    return ANSWERS.get(path, [] if method == "GET" else {})


def main():
    server, RECORDED = capture.start(answer)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.server_port)
    api.set_auth("user", "secret-token")
    square = Image.open(INPUTS / "square32.png")
    mask = Image.open(INPUTS / "mask-rgb32.png")
    calls = {
        "scripts": None,  # recorded by set_auth above
        "txt2img": lambda: api.txt2img(
            prompt="a photo of a cat", negative_prompt="blurry", seed=42, steps=4, cfg_scale=6.0,
            width=32, height=32, sampler_name="Euler", batch_size=2,
        ),
        "txt2img_defaults": lambda: api.txt2img(prompt="a photo of a cat", width=32, height=32, steps=4, seed=5),
        "img2img": lambda: api.img2img(
            images=[square], prompt="a photo of a cat", denoising_strength=0.5, seed=3, steps=4,
            cfg_scale=7.5, width=32, height=32, sampler_name="Euler",
        ),
        "img2img_mask": lambda: api.img2img(
            images=[square], mask_image=mask, prompt="a red hat", denoising_strength=1.0, seed=7,
            steps=4, width=32, height=32, sampler_name="Euler", mask_blur=0, inpainting_fill=1,
            inpaint_full_res=False,
        ),
        "samplers": lambda: api.get_samplers(),
        "schedulers": lambda: api.get_schedulers(),
        "sd_models": lambda: api.get_sd_models(),
        "options": lambda: api.get_options(),
        "set_options": lambda: api.set_options({"sd_model_checkpoint": "tiny-sd1"}),
        "progress": lambda: api.get_progress(),
        "interrupt": lambda: api.interrupt(),
        "skip": lambda: api.skip(),
        "png_info": lambda: api.png_info(square),
        "loras": lambda: api.get_loras(),
        "upscalers": lambda: api.get_upscalers(),
        "sd_vae": lambda: api.get_sd_vae(),
        "embeddings": lambda: api.get_embeddings(),
        "cmd_flags": lambda: api.get_cmd_flags(),
        "memory": lambda: api.get_memory(),
        "refresh_checkpoints": lambda: api.refresh_checkpoints(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    first = list(RECORDED)
    for name, call in calls.items():
        if call is None:
            got = first
        else:
            del RECORDED[:]
            call()
            got = RECORDED
        (OUT / f"{name}.json").write_text(json.dumps(got[0], indent=1) + "\n")
        print(name, got[0]["method"], got[0]["path"], got[0]["authorization"], len(got[0]["body_b64"]))
    server.shutdown()


if __name__ == "__main__":
    main()
