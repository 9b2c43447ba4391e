#!/usr/bin/env python3
"""Reference numbers for the sampler and RNG tests of the models crate.

Runs Hugging Face diffusers' schedulers and torch's CPU generator and writes small JSON files
to crates/models/tests/fixtures/samplers/:

- rng.json: torch.randn(n, generator=g) for several seeds, as a sequence of draws from one
  generator (so the generator state carrying over between calls is checked too), stored as
  float32 bit patterns.
- <config>.json: for one scheduler config and several (sampler, schedule, steps) cases, what
  `XScheduler.from_config(config, **sampler_overrides, **schedule_overrides)` +
  `set_timesteps(steps)` gives (timesteps, init_noise_sigma) and a full denoising loop on a
  small deterministic sample, run the way the diffusers pipelines run it:

      g = torch.Generator("cpu").manual_seed(seed)
      latents = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
      base = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(seed + 1000))
      for i, t in enumerate(scheduler.timesteps):
          x_in = scheduler.scale_model_input(latents, t)
          model_output = x_in * 0.5 + base * float32(0.3 + 0.01 * i)   # the "UNet"
          latents = scheduler.step(model_output, t, latents, generator=g).prev_sample

  `generator=g` is passed to every scheduler whose `step` takes a `generator` (as the
  pipelines' prepare_extra_step_kwargs does), so the per-step noise of the stochastic
  samplers (euler-a, dpm2-a, dpmpp-2m-sde, dpmpp-3m-sde, ddpm, lcm, tcd with eta > 0) comes
  from the generator that drew the initial latents. TCD's step also takes `eta`: the cases
  record the value used, 0.0 as StableDiffusionPipeline passes it (its `eta` argument) or
  0.3, TCDScheduler.step's default, where it is left out.

  Each case names its sampler and schedule (SAMPLERS, SCHEDULES below: "model" is the
  config as it is). Recorded: the first scaled input, the first prev_sample, the final
  sample and the L1 norm of the latents after every step (to locate a divergence). Where
  diffusers refuses the combination, the case records `error` (the message), `error_type`
  (the exception class) and `error_at` ("from_config", "set_timesteps" or "step", with
  `error_step` and the timesteps for the latter) instead.

Usage (from the repository root): /work/venv/bin/python scripts/make_sampler_fixtures.py
"""

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch
import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "models" / "tests" / "fixtures" / "samplers"

# Batch 2 (ancestral noise is one draw for the whole batch), 24 elements: the torch randn
# block path plus its "last 16 redrawn" tail.
SHAPE = [2, 2, 2, 3]
SEED = 1234

ORIGIN = (
    f"scripts/make_sampler_fixtures.py with diffusers {diffusers.__version__}, "
    f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})"
)

# sampler name -> (scheduler class, from_config overrides)
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2-a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp-2m-sde": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", solver_order=2),
    ),
    "dpmpp-3m-sde": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", solver_order=3),
    ),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}

# schedule name -> from_config overrides, applied on top of the sampler's.
SCHEDULES = {
    "model": {},
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "sgm_uniform": dict(timestep_spacing="trailing"),
}

# The samplers of the first fixtures (the Karras variant of DPM++ 2M is now a schedule).
OLD = ["ddim", "pndm", "euler", "euler-a", "dpmpp-2m", ("dpmpp-2m", "karras")]
NEW = ["heun", "lms", "dpm2", "dpm2-a", "dpmpp-2m-sde", "dpmpp-3m-sde", "unipc", "deis", "ddpm",
       "lcm", "tcd"]


def has_init_key(sampler, key):
    return key in inspect.signature(SAMPLERS[sampler][0].__init__).parameters


# Karras / exponential / beta sigmas exist on the classes with those __init__ keys.
SIGMA_SCHEDULE_SAMPLERS = [s for s in SAMPLERS if has_init_key(s, "use_karras_sigmas")]
# timestep_spacing="trailing": the classes that have the key and whose set_timesteps reads it
# (LCMScheduler and TCDScheduler have the key but their set_timesteps ignores it).
TRAILING_SAMPLERS = [
    s for s in SAMPLERS if has_init_key(s, "timestep_spacing") and s not in ("lcm", "tcd")
]
SCHEDULE_PAIRS = [(s, sch) for sch in ("karras", "exponential", "beta")
                  for s in SIGMA_SCHEDULE_SAMPLERS] + [(s, "sgm_uniform") for s in TRAILING_SAMPLERS]

SD15 = {
    # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD21_V = {
    # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SDXL = {
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

ZSNR_TRAILING_V = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}

# A DDPM-style config: linear betas, diffusers defaults for everything else (DDIM clips).
LINEAR_DEFAULTS = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "linear",
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "variance_type": "fixed_small",
}

COSINE_LINSPACE = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "clip_sample_range": 1.5,
    "set_alpha_to_one": True,
    "timestep_spacing": "linspace",
}

PNDM_PRK = dict(SD15, skip_prk_steps=False)

# Karras bounds set in the config; DPMSolverMultistepScheduler has no such __init__ keys but
# diffusers still reads them through the "hidden" config entries from_config registers.
EULER_KARRAS_BOUNDS = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "use_karras_sigmas": True,
    "sigma_min": 0.1,
    "sigma_max": 10.0,
    "timestep_spacing": "trailing",
}

EULER_LOG_LINEAR = dict(SD15, _class_name="EulerDiscreteScheduler", interpolation_type="log_linear")

EULER_KARRAS_SIGMA_MIN = dict(
    SD15,
    _class_name="EulerDiscreteScheduler",
    use_karras_sigmas=True,
    final_sigmas_type="sigma_min",
    timestep_spacing="leading",
)

DPM_HEUN_SIGMA_MIN_TRAILING = {
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "solver_type": "heun",
    "lower_order_final": False,
    "final_sigmas_type": "sigma_min",
    "timestep_spacing": "trailing",
}
# (Not with Karras sigmas: their last sigma equals sigma_min, the final step has h = 0 and
# diffusers' heun update divides 0 by 0; we give the same NaN.)
DPM_MIDPOINT_SIGMA_MIN_KARRAS = dict(DPM_HEUN_SIGMA_MIN_TRAILING, solver_type="midpoint")

DPM_EULER_AT_FINAL_LEADING = dict(
    SD15,
    _class_name="DPMSolverMultistepScheduler",
    euler_at_final=True,
    timestep_spacing="leading",
)

DPM_CLIPPED_V = dict(
    SD21_V,
    _class_name="DPMSolverMultistepScheduler",
    lambda_min_clipped=-5.1,
)

# trained_betas with a short training schedule; steps == num_train_timesteps is allowed.
TRAINED_BETAS_100 = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 100,
    "trained_betas": [float(b) for b in np.linspace(0.001, 0.1, 100) ** 1.5],
    "clip_sample": False,
    "set_alpha_to_one": False,
}

# LCM-LoRA style: the SD 1.5 config with the LCM class and its keys.
LCM_SD15 = dict(
    SD15,
    _class_name="LCMScheduler",
    timestep_spacing="leading",
    original_inference_steps=50,
)


def cases(samplers, steps):
    """(sampler, schedule, steps, extra) tuples; a sampler is a name or (name, schedule)."""
    out = []
    for s in samplers:
        name, schedule = (s, "model") if isinstance(s, str) else s
        out += [(name, schedule, n, {}) for n in steps]
    return out


# TCD's step with its own default eta (0.3) instead of the pipelines' 0.0.
TCD_DEFAULT_ETA = {"default_eta": True}

FIXTURES = {
    "sd15": (SD15, cases(OLD, (1, 2, 7, 20))
             + cases(["pndm", "euler-a", ("dpmpp-2m", "karras")], (50,))
             + cases(NEW, (1, 2, 7, 20))
             + cases([p for p in SCHEDULE_PAIRS if p != ("dpmpp-2m", "karras")], (7,))
             + [("tcd", "model", n, TCD_DEFAULT_ETA) for n in (2, 7)]),
    "sd21_v": (SD21_V, cases(OLD, (2, 7, 20))
               + cases(NEW, (2, 7))
               + cases([p for p in SCHEDULE_PAIRS if p != ("dpmpp-2m", "karras")], (7,))
               + [("tcd", "model", 7, TCD_DEFAULT_ETA)]),
    "sdxl": (SDXL, cases(OLD, (7, 20)) + cases(NEW, (2, 7))),
    "zsnr_trailing_v": (ZSNR_TRAILING_V, cases(OLD, (3, 7)) + cases(NEW, (2, 7))),
    "linear_defaults": (LINEAR_DEFAULTS, cases(OLD, (1, 7, 20))),
    "cosine_linspace": (COSINE_LINSPACE, cases(OLD, (7, 20))),
    "pndm_prk": (PNDM_PRK, cases(["pndm"], (1, 2, 3, 4, 7, 20))),
    # (The config sets use_karras_sigmas, so dpmpp-2m with the "model" schedule has Karras
    # sigmas here too.)
    "euler_karras_bounds": (
        EULER_KARRAS_BOUNDS,
        cases(["euler", ("dpmpp-2m", "karras"), "dpmpp-2m"], (7, 20)),
    ),
    "euler_log_linear": (EULER_LOG_LINEAR, cases(["euler"], (7, 20))),
    "euler_karras_sigma_min": (EULER_KARRAS_SIGMA_MIN, cases(["euler"], (7, 20))),
    "dpm_heun_sigma_min_trailing": (DPM_HEUN_SIGMA_MIN_TRAILING, cases(["dpmpp-2m"], (7, 20))),
    "dpm_midpoint_sigma_min_karras": (
        DPM_MIDPOINT_SIGMA_MIN_KARRAS,
        cases([("dpmpp-2m", "karras")], (7, 20)),
    ),
    "dpm_euler_at_final_leading": (DPM_EULER_AT_FINAL_LEADING, cases(["dpmpp-2m"], (7, 20))),
    "dpm_clipped_v": (DPM_CLIPPED_V, cases(["dpmpp-2m", ("dpmpp-2m", "karras")], (7, 20))),
    # (DPM-Solver with steps close to num_train_timesteps repeats a rounded timestep, h = 0,
    # and diffusers' second-order update then produces NaN; we give the same NaN.)
    "trained_betas_100": (
        TRAINED_BETAS_100,
        cases(["ddim", "pndm", "euler", "euler-a"], (1, 100)) + cases(["dpmpp-2m"], (1, 40)),
    ),
    "lcm_sd15": (LCM_SD15, cases(["lcm", "tcd"], (1, 4, 8))
                 + [("tcd", "model", n, TCD_DEFAULT_ETA) for n in (1, 4, 8)]),
}


def f32s(t):
    """A float32 tensor as a flat list of floats with 9 significant digits (round-trips)."""
    return [float("%.9g" % v) for v in t.detach().reshape(-1).numpy().astype(np.float32)]


def coeff(i):
    return float(np.float32(0.3 + 0.01 * i))


def run_case(config, sampler, schedule, steps, extra):
    cls, overrides = SAMPLERS[sampler]
    head = {"sampler": sampler, "schedule": schedule, "steps": steps}

    def refused(stage, e, **more):
        # Diffusers refuses the combination; we must refuse it too.
        return {**head, "error": str(e), "error_type": type(e).__name__, "error_at": stage, **more}

    try:
        sched = cls.from_config(config, **{**overrides, **SCHEDULES[schedule]})
    except Exception as e:  # noqa: BLE001 (recorded)
        return refused("from_config", e)
    try:
        sched.set_timesteps(steps)
    except Exception as e:  # noqa: BLE001
        # e.g. PNDM with PRK warm-up steps and fewer than 4 steps.
        return refused("set_timesteps", e)
    timesteps = [float(np.float32(t)) if t.is_floating_point() else int(t) for t in sched.timesteps]
    # If the first timestep occurs twice (e.g. Karras sigmas on a squaredcos schedule give
    # [998, 998, 998, ...]), diffusers starts at the *second* occurrence and the txt2img
    # loop fails with an IndexError on its last step; pin the start to index 0 (what
    # img2img pipelines do with set_begin_index) so that there is a reference to compare.
    begin_index_pinned = bool((sched.timesteps == sched.timesteps[0]).sum() > 1)
    if begin_index_pinned:
        sched.set_begin_index(0)
    step_params = inspect.signature(sched.step).parameters
    kwargs = {}
    g = torch.Generator("cpu").manual_seed(SEED)
    if "generator" in step_params:
        kwargs["generator"] = g
    if sampler == "tcd":
        # StableDiffusionPipeline passes its eta (default 0.0); some cases leave it out.
        if extra.get("default_eta"):
            head["eta"] = step_params["eta"].default
        else:
            kwargs["eta"] = head["eta"] = 0.0
    latents = torch.randn(SHAPE, generator=g, dtype=torch.float32) * sched.init_noise_sigma
    base = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(SEED + 1000))
    first_input = first_prev = None
    trace = []
    for i, t in enumerate(sched.timesteps):
        try:
            x_in = sched.scale_model_input(latents, t)
            model_output = x_in * 0.5 + base * coeff(i)
            latents = sched.step(model_output, t, latents, **kwargs).prev_sample
        except Exception as e:  # noqa: BLE001
            return refused("step", e, error_step=i, timesteps=timesteps)
        if i == 0:
            first_input, first_prev = x_in, latents
        trace.append(float("%.9g" % latents.double().abs().sum().item()))
    case = {
        **head,
        "timesteps": timesteps,
        "init_noise_sigma": float(np.float32(sched.init_noise_sigma)),
        "begin_index_pinned": begin_index_pinned,
        "l1_trace": trace,
        "final_sample": f32s(latents),
    }
    if first_input is not None:
        case["first_scaled_input"] = f32s(first_input)
        case["first_prev_sample"] = f32s(first_prev)
    return case


def bits(t):
    return [int(b) for b in t.numpy().astype(np.float32).reshape(-1).view(np.uint32)]


def make_rng():
    long_draws = [1, 3, 16, 17, 5, 100, 1, 1024, 15, 2, 31]
    short_draws = [1, 3, 16, 17, 5, 100, 1, 15, 2, 31, 40]
    cases = []
    for seed, draws in [
        (0, long_draws),
        (42, long_draws),
        (1, short_draws),
        (SEED, short_draws),
        (123456789, short_draws),
        (2**32 + 5, short_draws),
        (2**63, short_draws),
        (2**64 - 1, short_draws),
    ]:
        g = torch.Generator("cpu").manual_seed(seed)
        out = []
        for n in draws:
            out.append({"n": n, "bits": bits(torch.randn(n, generator=g, dtype=torch.float32))})
        cases.append({"seed": seed, "draws": out})
    # A shaped draw equals the flat draw of the same length.
    g = torch.Generator("cpu").manual_seed(7)
    shaped = {"seed": 7, "shape": [2, 4, 3, 5], "bits": bits(torch.randn([2, 4, 3, 5], generator=g))}
    return {"origin": ORIGIN, "cases": cases, "shaped": shaped}


def write(name, obj):
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n")
    return path.stat().st_size


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    total = write("rng", make_rng())
    for name, (config, fixture_cases) in FIXTURES.items():
        obj = {
            "origin": ORIGIN,
            "shape": SHAPE,
            "seed": SEED,
            "config": config,
            "cases": [run_case(config, *c) for c in fixture_cases],
        }
        total += write(name, obj)
    print(f"wrote {len(FIXTURES) + 1} files, {total} bytes, to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
