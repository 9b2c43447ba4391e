#!/usr/bin/env python3
"""diffusers' images for every sampler and schedule on the tiny fixture models.

Needs the folders written by make_fixtures.py (models/tiny-sd1, epsilon; models/tiny-sd2,
v_prediction) and the input image written by make_img2img_fixtures.py. For each case the
pipeline's scheduler is replaced the way a user switches samplers:

    pipe.scheduler = Cls.from_config(pipe.scheduler.config, **sampler_overrides,
                                     **schedule_overrides)

(SAMPLERS and SCHEDULES of make_sampler_fixtures.py: "model" keeps the model's config; the
loaded config is the one the pipeline constructor patched, so e.g. DDIM / DDPM swapped in
on tiny-sd1, whose PNDM config has no clip_sample, get clip_sample=True.) Then
StableDiffusionPipeline (txt2img) or StableDiffusionImg2ImgPipeline runs in float32 on the
CPU with generator=torch.Generator("cpu").manual_seed(seed), so the initial latents and the
per-step noise of the stochastic samplers come from that one generator (for dpmpp-sde: the
root seed of its Brownian tree, drawn at its first step). The pipelines' `eta` (passed to
DDIM and TCD steps) is 0.0 unless a case sets it. dpmpp-2s-a's scheduler is
make_sampler_fixtures.DPMPP2SAncestralScheduler (k-diffusion's sample_dpmpp_2s_ancestral),
dpmpp-sde's is DPMSolverSDEScheduler with that script's Brownian tree noise.

Writes, under fixtures/reference/samplers/:
  <case>.safetensors  `images`: the final uint8 images (B, H, W, 3), round(clamp(x, 0, 1) * 255)
                      of the pipeline's "np" output, which is what its "pil" output holds
  cases.json          `origin` (script and library versions) and `cases`, each with name,
                      model, pipeline ("txt2img" / "img2img"), sampler, schedule, prompt,
                      negative_prompt, width, height, steps, guidance, seed, batch, eta,
                      strength and image (img2img: the input, relative to fixtures/), order
                      (the scheduler's), timesteps (every timestep the pipeline ran the UNet
                      at, as floats: img2img skips the first t_start * order),
                      scheduler_class and scheduler_config (what from_config gave; a
                      non-finite float, e.g. lambda_min_clipped, as the string "-inf");
                      dpmpp-sde cases also "noise": "brownian-tree-v2", dpmpp-2s-a cases
                      "reference" (as in the sampler fixtures)

Run with the venv described in the README:  python scripts/make_sampler_image_fixtures.py
Deterministic: reruns write the same bytes.
"""

import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, load_sd2  # noqa: E402
from make_sampler_fixtures import (  # noqa: E402
    CASE_NOTES, CUSTOM_SIGMA_SCHEDULES, NEWER, SAMPLERS, SCHEDULES, a1111_sigmas,
    set_brownian_generator)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline  # noqa: E402

OUT = ROOT / "reference" / "samplers"
INPUT = "inputs/wide48x32.png"

ORIGIN = (
    f"scripts/make_sampler_image_fixtures.py with diffusers {diffusers.__version__}, "
    f"transformers {transformers.__version__}, torch {torch.__version__} "
    f"(CPU capability {torch.backends.cpu.get_cpu_capability()})"
)

PROMPTS = ["a photo of a cat", "a red chair in the garden", "green trees under a blue sky"]
NEGATIVE = "blurry, dark"


def txt2img(name, model, sampler, schedule="model", *, seed, steps=6, guidance=7.5,
            negative=NEGATIVE, width=48, height=32, batch=1, prompt=None, eta=None):
    return dict(name=name, model=model, pipeline="txt2img", sampler=sampler, schedule=schedule,
                prompt=prompt or PROMPTS[seed % len(PROMPTS)], negative_prompt=negative,
                width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                batch=batch, eta=eta)


FEW_STEP = ("lcm", "tcd")


def per_sampler(model, first_seed, samplers):
    """Each of `samplers` with the model's own schedule (seed: first_seed + its index in
    SAMPLERS); LCM and TCD at 4 steps without CFG (sd1) or with a low guidance (sd2), as they
    are used."""
    out = []
    for s in samplers:
        kw = dict(seed=first_seed + list(SAMPLERS).index(s))
        if s in FEW_STEP:
            kw.update(steps=4, guidance=1.0 if model == "tiny-sd1" else 2.0)
            if model == "tiny-sd1":
                kw.update(negative=None)
        short = model.removeprefix("tiny-")
        out.append(txt2img(f"{short}-{s}", model, s, **kw))
    return out


OLDER = [s for s in SAMPLERS if s not in NEWER]

CASES = (
    per_sampler("tiny-sd1", 100, OLDER)
    + per_sampler("tiny-sd2", 200, OLDER)
    + [
        # Karras / exponential / beta sigmas and trailing ("sgm_uniform") spacing. (tiny-sd2's
        # own config is trailing already, so sgm_uniform runs on tiny-sd1.)
        txt2img("sd1-dpmpp-2m-karras", "tiny-sd1", "dpmpp-2m", "karras", seed=300),
        txt2img("sd1-heun-karras-8", "tiny-sd1", "heun", "karras", seed=301, steps=8),
        txt2img("sd2-dpmpp-2m-sde-karras", "tiny-sd2", "dpmpp-2m-sde", "karras", seed=302),
        txt2img("sd1-euler-exponential", "tiny-sd1", "euler", "exponential", seed=303,
                width=32, height=48),
        txt2img("sd2-unipc-exponential", "tiny-sd2", "unipc", "exponential", seed=304),
        txt2img("sd2-dpm2-exponential", "tiny-sd2", "dpm2", "exponential", seed=305),
        txt2img("sd1-lms-beta", "tiny-sd1", "lms", "beta", seed=306),
        txt2img("sd1-deis-beta", "tiny-sd1", "deis", "beta", seed=307, negative=None),
        txt2img("sd2-dpmpp-3m-sde-beta-8", "tiny-sd2", "dpmpp-3m-sde", "beta", seed=308, steps=8),
        txt2img("sd1-ddim-sgm-uniform", "tiny-sd1", "ddim", "sgm_uniform", seed=309),
        txt2img("sd1-euler-a-sgm-uniform", "tiny-sd1", "euler-a", "sgm_uniform", seed=310),
        txt2img("sd1-dpmpp-2m-sgm-uniform", "tiny-sd1", "dpmpp-2m", "sgm_uniform", seed=311),
        # Batch 2: the ancestral noise of a step is one draw for the whole batch.
        txt2img("sd1-dpmpp-2m-sde-batch2", "tiny-sd1", "dpmpp-2m-sde", seed=312, batch=2),
        # TCD with the eta its authors recommend (the pipeline's default is 0.0).
        txt2img("sd1-tcd-eta03", "tiny-sd1", "tcd", seed=313, steps=4, guidance=1.0,
                negative=None, eta=0.3),
        # DDIM with the pipelines' eta: fresh noise from the generator after every step.
        txt2img("sd1-ddim-eta05", "tiny-sd1", "ddim", seed=314, eta=0.5),
        txt2img("sd2-ddim-eta1", "tiny-sd2", "ddim", seed=315, eta=1.0),
        # Image to image: a multistep sampler, and Heun (order 2: the pipeline skips
        # t_start * order timesteps and sets the begin index there).
        dict(name="i2i-sd1-unipc-s06", model="tiny-sd1", pipeline="img2img", sampler="unipc",
             schedule="model", prompt=PROMPTS[0], negative_prompt=NEGATIVE, steps=6,
             guidance=7.5, seed=400, batch=1, strength=0.6, image=INPUT, eta=None),
        dict(name="i2i-sd1-heun-s06", model="tiny-sd1", pipeline="img2img", sampler="heun",
             schedule="model", prompt=PROMPTS[1], negative_prompt=NEGATIVE, steps=6,
             guidance=7.5, seed=401, batch=1, strength=0.6, image=INPUT, eta=None),
        dict(name="i2i-sd2-dpmpp-2m-sde-s06", model="tiny-sd2", pipeline="img2img",
             sampler="dpmpp-2m-sde", schedule="model", prompt=PROMPTS[2],
             negative_prompt=NEGATIVE, steps=6, guidance=7.5, seed=402, batch=1, strength=0.6,
             image=INPUT, eta=None),
    ]
    # The samplers without an exact diffusers equivalent: DPM++ SDE (diffusers'
    # DPMSolverSDEScheduler with our Brownian tree noise, its root seed drawn from the
    # pipeline's generator after the initial latents) and DPM++ 2S a (k-diffusion's
    # sample_dpmpp_2s_ancestral, make_sampler_fixtures.DPMPP2SAncestralScheduler).
    + per_sampler("tiny-sd1", 100, NEWER)
    + per_sampler("tiny-sd2", 200, NEWER)
    + [
        txt2img("sd1-dpmpp-sde-karras", "tiny-sd1", "dpmpp-sde", "karras", seed=316),
        # A1111's simple and normal schedules, as Euler's custom sigmas.
        txt2img("sd1-euler-simple", "tiny-sd1", "euler", "simple", seed=319),
        txt2img("sd2-euler-normal", "tiny-sd2", "euler", "normal", seed=320),
        txt2img("sd2-dpmpp-2s-a-karras", "tiny-sd2", "dpmpp-2s-a", "karras", seed=317),
        # Batch 2: one Brownian tree over the whole (2, 4, h, w) latent.
        txt2img("sd1-dpmpp-sde-batch2", "tiny-sd1", "dpmpp-sde", seed=318, batch=2),
    ]
)


def to_uint8(np_images):
    """What the pipelines' "pil" output holds (numpy_to_pil), checked against it."""
    u8 = (np_images * 255).round().astype(np.uint8)
    via_pil = np.stack([np.asarray(im) for im in diffusers.image_processor.VaeImageProcessor
                        .numpy_to_pil(np_images)])
    assert np.array_equal(u8, via_pil)
    return u8


def run_case(pipes, case):
    case = dict(case)
    pipe = pipes[case["model"]][case["pipeline"]]
    cls, overrides = SAMPLERS[case["sampler"]]
    pipe.scheduler = cls.from_config(
        pipes[case["model"]]["base"], **{**overrides, **SCHEDULES[case["schedule"]]}
    )
    ran = []

    def on_step_end(p, i, t, kw):
        ran.append(float(t))
        return {}

    generator = torch.Generator("cpu").manual_seed(case["seed"])
    set_brownian_generator(generator)  # (dpmpp-sde draws its noise's root seed from it)
    kwargs = dict(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        num_images_per_prompt=case["batch"],
        generator=generator,
        output_type="np",
        callback_on_step_end=on_step_end,
    )
    if case["eta"] is not None:
        kwargs["eta"] = case["eta"]
    if case["schedule"] in CUSTOM_SIGMA_SCHEDULES:
        kwargs["sigmas"] = a1111_sigmas(pipe.scheduler, case["schedule"], case["steps"])
    if case["pipeline"] == "img2img":
        image = Image.open(ROOT / case["image"]).convert("RGB")
        case["width"], case["height"] = image.size
        kwargs.update(image=image, strength=case["strength"])
    else:
        kwargs.update(width=case["width"], height=case["height"])
    with torch.no_grad():
        result = pipe(**kwargs)
    images = to_uint8(result.images)
    assert images.shape == (case["batch"], case["height"], case["width"], 3), images.shape
    save_file({"images": torch.from_numpy(images).contiguous()},
              OUT / f"{case['name']}.safetensors")
    sched = pipe.scheduler
    if case["pipeline"] == "img2img":
        # What get_timesteps keeps of the full schedule.
        init_timestep = min(int(case["steps"] * case["strength"]), case["steps"])
        t_start = max(case["steps"] - init_timestep, 0)
        assert ran == [float(t) for t in sched.timesteps[t_start * sched.order:]], ran
    else:
        assert ran == [float(t) for t in sched.timesteps], ran
    finite = np.isfinite(result.images).all()
    print(f"{case['name']}: {images.shape}, {len(ran)} UNet steps, pixel std "
          f"{images.astype(np.float32).std():.1f}{'' if finite else ', NON-FINITE'}")
    entry = {k: case[k] for k in ("name", "model", "pipeline", "sampler", "schedule", "prompt",
                                  "negative_prompt", "width", "height", "steps", "guidance",
                                  "seed", "batch")}
    entry.update(CASE_NOTES.get(case["sampler"], {}))
    if "eta" in inspect.signature(sched.step).parameters:
        # (The pipelines pass their `eta`, default 0.0, to the steps that take one.)
        entry["eta"] = case["eta"] if case["eta"] is not None else 0.0
    if case["pipeline"] == "img2img":
        entry["strength"] = case["strength"]
        entry["image"] = case["image"]
    entry["order"] = sched.order
    entry["timesteps"] = ran
    entry["scheduler_class"] = type(sched).__name__
    entry["scheduler_config"] = {k: json_value(v) for k, v in dict(sched.config).items()
                                 if not k.startswith("_")}
    return entry


def json_value(v):
    """Config values for JSON: non-finite floats (DPM-Solver's lambda_min_clipped = -inf) as
    the strings "inf", "-inf", "nan"; tuples as lists."""
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    return v


def main():
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    assert (ROOT / INPUT).exists(), f"{ROOT / INPUT}: run make_img2img_fixtures.py first"
    sd1 = StableDiffusionPipeline.from_pretrained(
        ROOT / "models" / "tiny-sd1", safety_checker=None, requires_safety_checker=False)
    sd2 = load_sd2(ROOT / "models" / "tiny-sd2")
    pipes = {}
    for model, pipe in [("tiny-sd1", sd1), ("tiny-sd2", sd2)]:
        i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        for p in (pipe, i2i):
            p.set_progress_bar_config(disable=True)
        pipes[model] = {"txt2img": pipe, "img2img": i2i, "base": dict(pipe.scheduler.config)}
    cases = [run_case(pipes, c) for c in CASES]
    (OUT / "cases.json").write_text(
        json.dumps({"origin": ORIGIN, "cases": cases}, indent=1, allow_nan=False) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(cases)} sampler image references: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
