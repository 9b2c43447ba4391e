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
  samplers (euler-a, dpm2-a, dpmpp-2m-sde, dpmpp-3m-sde, ddpm, lcm, tcd with eta > 0,
  dpmpp-2s-a) comes from the generator that drew the initial latents. TCD's step also takes
  `eta`: the cases record the value used, 0.0 as StableDiffusionPipeline passes it (its
  `eta` argument) or 0.3, TCDScheduler.step's default, where it is left out.

  Each case names its sampler and schedule (SAMPLERS, SCHEDULES below: "model" is the
  config as it is). Recorded: the first scaled input, the first prev_sample, the final
  sample and the L1 norm of the latents after every step (to locate a divergence). Where
  diffusers refuses the combination, the case records `error` (the message), `error_type`
  (the exception class) and `error_at` ("from_config", "set_timesteps" or "step", with
  `error_step` and the timesteps for the latter) instead.

  Two samplers have no exact diffusers equivalent; their cases come last in each file:
  - dpmpp-sde ("DPM++ SDE"): diffusers' DPMSolverSDEScheduler, unchanged but for its noise,
    which comes from our Brownian tree (BrownianTreeV2 below) instead of torchsde's; the tree's
    root seed is drawn from g when the scheduler creates its noise sampler (at the first
    step, after the initial latents). Its cases record "noise": "brownian-tree-v2" and
    "noise_root", the root seed drawn.
  - dpmpp-2s-a ("DPM++ 2S a"): k-diffusion's sample_dpmpp_2s_ancestral, written here as a
    diffusers-style scheduler (DPMPP2SAncestralScheduler below, which documents its tables
    and float semantics). Its cases record "reference": "k-diffusion
    sample_dpmpp_2s_ancestral (scripts/make_sampler_fixtures.py)".
  (torchsde is not needed: DPMSolverSDEScheduler's module imports it, a placeholder stands in
  where it is not installed.)

Usage (from the repository root): /work/venv/bin/python scripts/make_sampler_fixtures.py
"""

import importlib.machinery
import inspect
import json
import math
import struct
import sys
import types
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
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

try:
    import torchsde  # noqa: F401
except ImportError:
    # scheduling_dpmsolver_sde imports torchsde at module level, but its noise sampler is
    # replaced below (BrownianTreeNoiseSamplerV2), so a placeholder module is enough.
    sys.modules["torchsde"] = types.ModuleType("torchsde")
    sys.modules["torchsde"].__spec__ = importlib.machinery.ModuleSpec("torchsde", None)
from diffusers.schedulers import scheduling_dpmsolver_sde  # noqa: E402
from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler  # noqa: E402

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


# --- DPM++ SDE with our Brownian tree ------------------------------------------------------
#
# diffusers' DPMSolverSDEScheduler draws its noise from torchsde's Brownian interval, which no
# port can reproduce bit for bit. The reference for "dpmpp-sde" is that scheduler unchanged
# (set_timesteps, scale_model_input, step) with its module-level BrownianTreeNoiseSampler
# replaced by BrownianTreeNoiseSamplerV2 below ("brownian-tree-v2"), a Brownian tree of our
# own definition (crates/models/src/samplers/brownian.rs), written in float32 torch ops in the
# order the port runs them.

U64 = 2**64 - 1
BROWNIAN_TREE_LEVELS = 12


def splitmix64(x):
    """The SplitMix64 step + finaliser on a u64 (wrapping arithmetic)."""
    x = (x + 0x9E3779B97F4A7C15) & U64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def node_normal(seed, shape):
    """One standard-normal float32 tensor per tree node: torch.randn from a fresh CPU
    generator seeded with the node's u64 (torch's mt19937 keeps only its low 32 bits)."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed),
                       dtype=torch.float32)


class BrownianTreeV2:
    """W over u = log(sigma), known on the 2**LEVELS + 1 grid points evenly spaced between
    log(sigma_min) and log(sigma_max) (float64): W(0) = 0, W(end) = N(mix(root)) *
    sqrt(u1 - u0), and each other grid point by bisection from [0, end], the midpoint of
    [a, b] drawn from the Brownian bridge of its ends, (wa + wb) * 0.5 + N(node) *
    sqrt((b - a) * h * 0.25), the first node seed mix(root ^ 1), children mix(2 node)
    (left) and mix(2 node + 1) (right). A sigma is snapped to the nearest grid point
    (float64 log, round half to even), so a last-bit difference in the float32 sigma does not
    change the noise."""

    def __init__(self, sigma_min, sigma_max, root, shape):
        self.u0, self.u1 = math.log(sigma_min), math.log(sigma_max)
        self.n = 2**BROWNIAN_TREE_LEVELS
        self.h = (self.u1 - self.u0) / self.n
        self.root, self.shape = root, shape
        self.w_end = node_normal(splitmix64(root), shape) * float(math.sqrt(self.u1 - self.u0))

    def index(self, sigma):
        if not self.h > 0:
            return 0
        k = round((math.log(sigma) - self.u0) / self.h)
        return min(max(k, 0), self.n)

    def w(self, k):
        a, b = 0, self.n
        wa, wb = torch.zeros(self.shape, dtype=torch.float32), self.w_end
        node = splitmix64(self.root ^ 1)
        while True:
            if k == a:
                return wa
            if k == b:
                return wb
            m = (a + b) // 2
            wm = (wa + wb) * 0.5 + node_normal(node, self.shape) * float(
                math.sqrt((b - a) * self.h * 0.25))
            if k < m:
                b, wb, node = m, wm, splitmix64((node * 2) & U64)
            else:
                a, wa, node = m, wm, splitmix64((node * 2 + 1) & U64)


# The generator of the current denoising loop (the one that drew the initial latents and is
# passed to the pipeline); the noise sampler draws its root seed from it when the scheduler
# creates it (at its first step).
BROWNIAN_GENERATOR = {"generator": None}


def set_brownian_generator(g):
    BROWNIAN_GENERATOR["generator"] = g


class BrownianTreeNoiseSamplerV2:
    """Stands in for scheduling_dpmsolver_sde.BrownianTreeNoiseSampler, which the scheduler
    creates at its first step as BrownianTreeNoiseSampler(sample, min_sigma, max_sigma,
    config.noise_sampler_seed) (min over the positive sigmas, max, as Python floats) and
    calls as noise_sampler(sigma_from, sigma_to) with float32 0-d tensors.

    The seed argument is ignored: the root seed is int(torch.randint(0, 2**31, (1,),
    generator=g)) drawn from the loop's generator g at construction. (torch takes the low 31
    bits of a 64-bit draw for that range: two mt19937 outputs are consumed and the root is
    the second one & 0x7fffffff.) One tree covers the whole latent (all batch items).
    Returns (W(k_to) - W(k_from)) * (1 / sqrt(|k_to - k_from| * h)) at the sigmas' grid
    points; zeros where they snap to the same point.
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None):
        g = BROWNIAN_GENERATOR["generator"]
        if g is None:
            raise RuntimeError("set_brownian_generator(g) before running DPMSolverSDEScheduler")
        root = int(torch.randint(0, 2**31, (1,), generator=g).item())
        self.root = root
        self.tree = BrownianTreeV2(float(sigma_min), float(sigma_max), root, tuple(x.shape))

    def __call__(self, sigma, sigma_next):
        k, k_next = self.tree.index(float(sigma)), self.tree.index(float(sigma_next))
        if k == k_next:
            return torch.zeros(self.tree.shape, dtype=torch.float32)
        scale = 1.0 / math.sqrt(abs(k_next - k) * self.tree.h)
        return (self.tree.w(k_next) - self.tree.w(k)) * float(scale)


scheduling_dpmsolver_sde.BrownianTreeNoiseSampler = BrownianTreeNoiseSamplerV2


# --- DPM++ 2S ancestral ----------------------------------------------------------------------


class DPMPP2SAncestralScheduler(SchedulerMixin, ConfigMixin):
    """k-diffusion's sample_dpmpp_2s_ancestral (eta = 1; s_noise a step argument, default 1) as a diffusers-style
    scheduler, one model evaluation per step() call. diffusers has no such class.

    Config: EulerAncestralDiscreteScheduler's keys and defaults (its betas, zero-SNR rescale
    with alphas_cumprod[-1] = 2**-24) plus use_karras_sigmas / use_exponential_sigmas /
    use_beta_sigmas.

    set_timesteps(n), as KDPM2AncestralDiscreteScheduler.set_timesteps builds its base table:
    - timesteps T_i: numpy float32 linspace / leading (+ steps_offset) / trailing (- 1);
    - sigmas_i = np.interp(T_i, arange, sqrt((1 - ac) / ac) as float32) (float64), or the
      Karras / exponential / beta conversion of those (KDPM2A's _convert_to_*, float64), and
      then T_i = _sigma_to_t(sigma_i, log_sigmas) (float64; rounded half to even for Karras);
      sigmas = [sigma_0, ..., sigma_{n-1}, 0] cast to float32 (without a conversion: exactly
      EulerAncestralDiscreteScheduler's sigmas and timesteps). log_sigmas = numpy float32 log
      of the float32 training sigmas. Timestep dtype: float32 without a conversion, float64
      with one.
    - per step i, with float32 0-d torch tensors sigma = sigmas[i], sigma_next = sigmas[i+1]
      and the expressions of k-diffusion (every operation a float32 scalar op):
        sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
      (Python min: sigma_up is the second operand only where it is < sigma_next.) Where
      sigma_down != 0 the step has a second evaluation:
        t = -log(sigma); t_next = -log(sigma_down); h = t_next - t; s = t + 0.5 * h
        sigma_s = exp(-s)
        ratio_s = exp(-s) / exp(-t);        c_s = expm1(-h * 0.5)
        ratio_next = exp(-t_next) / exp(-t); c_next = expm1(-h)
      and its timestep is _sigma_to_t(float64(sigma_s), log_sigmas) computed in float64 (as
      for the converted sigmas), then cast to the timesteps' dtype.
    - timesteps = [T_0, Ts_0, T_1, Ts_1, ..., T_{n-1}]: one entry per model evaluation, Ts_i
      only for the steps with sigma_down != 0 (every step but the last for ordinary
      schedules: 2n - 1 entries, KDPM2A's layout); order = 2.
    - init_noise_sigma = max(sigmas), or (max**2 + 1) ** 0.5 with leading spacing.

    scale_model_input: sample / (sigma_in**2 + 1) ** 0.5, sigma_in = sigma or sigma_s.
    Denoiser at sigma_in (as diffusers' Euler schedulers write pred_original_sample):
        epsilon:      sample - sigma_in * model_output
        v_prediction: model_output * (-sigma_in / (sigma_in**2 + 1) ** 0.5)
                      + sample / (sigma_in**2 + 1)
    step, first evaluation of step i (sample = x): denoised = D(x, sigma);
        sigma_down == 0: x = x + (x - denoised) / sigma * (sigma_down - sigma), then noise;
        else: remember x, return x_2 = ratio_s * x - c_s * denoised.
    step, second evaluation (sample = x_2): denoised_2 = D(x_2, sigma_s);
        x = ratio_next * x - c_next * denoised_2, then noise.
    Noise, where sigma_next > 0: x = x + torch.randn(x.shape, generator=generator) * sigma_up
    (one draw of the whole latent from the generator passed to step).

    Checked against k-diffusion 0.1.1.post1's sample_dpmpp_2s_ancestral (same denoiser,
    sigmas and noise drawn from the same generator) on sd15, sd21_v, sdxl and
    zsnr_trailing_v, every schedule, 1, 2, 7 and 20 steps: the results are bit-identical.
    """

    _compatibles = []
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
    ):
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError(
                "Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                "`config.use_karras_sigmas` can be used."
            )
        # EulerAncestralDiscreteScheduler's betas and alphas_cumprod.
        euler = EulerAncestralDiscreteScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas,
            prediction_type=prediction_type, timestep_spacing=timestep_spacing,
            steps_offset=steps_offset, rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.betas, self.alphas = euler.betas, euler.alphas
        self.alphas_cumprod = euler.alphas_cumprod
        self.sigmas = euler.sigmas
        self.timesteps = euler.timesteps
        self.num_inference_steps = None
        self._steps = []
        self._calls = []
        self._pending = None
        self._step_index = None
        self._begin_index = None

    # KDPM2AncestralDiscreteScheduler's conversions (they read sigma_min / sigma_max from the
    # config where present) and its step-index bookkeeping.
    _sigma_to_t = KDPM2AncestralDiscreteScheduler._sigma_to_t
    _convert_to_karras = KDPM2AncestralDiscreteScheduler._convert_to_karras
    _convert_to_exponential = KDPM2AncestralDiscreteScheduler._convert_to_exponential
    _convert_to_beta = KDPM2AncestralDiscreteScheduler._convert_to_beta
    index_for_timestep = KDPM2AncestralDiscreteScheduler.index_for_timestep
    _init_step_index = KDPM2AncestralDiscreteScheduler._init_step_index
    set_begin_index = KDPM2AncestralDiscreteScheduler.set_begin_index

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    @property
    def init_noise_sigma(self):
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = n = num_inference_steps
        num_train_timesteps = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            timesteps = np.linspace(0, num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            step_ratio = num_train_timesteps // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
            timesteps += self.config.steps_offset
        elif spacing == "trailing":
            step_ratio = num_train_timesteps / n
            timesteps = np.arange(num_train_timesteps, 0, -step_ratio).round().copy()
            timesteps = timesteps.astype(np.float32)
            timesteps -= 1
        else:
            raise ValueError(f"{spacing} is not supported.")

        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas:
            sigmas = self._convert_to_karras(in_sigmas=sigmas, num_inference_steps=n)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas]).round()
        elif self.config.use_exponential_sigmas:
            sigmas = self._convert_to_exponential(in_sigmas=sigmas, num_inference_steps=n)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])
        elif self.config.use_beta_sigmas:
            sigmas = self._convert_to_beta(in_sigmas=sigmas, num_inference_steps=n)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas])
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        timesteps = torch.from_numpy(timesteps)

        steps, calls, all_t = [], [], []
        # (Trailing spacing gives n + 1 sigmas for some n, numpy's arange rule: k-diffusion
        # walks them all.)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            sigma_up = min(
                sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            )
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            p = dict(sigma=sigma, sigma_next=sigma_next, sigma_up=sigma_up,
                     sigma_down=sigma_down, two_stage=bool(sigma_down != 0))
            steps.append(p)
            calls.append((i, 0))
            all_t.append(timesteps[i])
            if p["two_stage"]:
                t = sigma.log().neg()
                t_next = sigma_down.log().neg()
                h = t_next - t
                s = t + 0.5 * h
                p["sigma_s"] = s.neg().exp()
                p["ratio_s"] = s.neg().exp() / t.neg().exp()
                p["c_s"] = (-h * 0.5).expm1()
                p["ratio_next"] = t_next.neg().exp() / t.neg().exp()
                p["c_next"] = (-h).expm1()
                t_s = self._sigma_to_t(np.float64(p["sigma_s"].item()), log_sigmas)
                calls.append((i, 1))
                all_t.append(torch.tensor(float(t_s), dtype=timesteps.dtype))
        self.sigmas = sigmas
        self._steps, self._calls = steps, calls
        self.timesteps = torch.stack(all_t).to(device=device)
        self._pending = None
        self._step_index = None
        self._begin_index = None

    def _call(self):
        return self._calls[self._step_index]

    def scale_model_input(self, sample, timestep):
        if self.step_index is None:
            self._init_step_index(timestep)
        i, stage = self._call()
        p = self._steps[i]
        sigma = p["sigma"] if stage == 0 else p["sigma_s"]
        return sample / ((sigma**2 + 1) ** 0.5)

    def _denoised(self, model_output, sample, sigma):
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        raise ValueError(f"prediction_type {self.config.prediction_type} is not supported")

    @staticmethod
    def _noise(x, p, generator, s_noise):
        if p["sigma_next"] > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + noise * s_noise * p["sigma_up"]
        return x

    def step(self, model_output, timestep, sample, generator=None, return_dict=True,
             s_noise=1.0):
        if self.step_index is None:
            self._init_step_index(timestep)
        i, stage = self._call()
        p = self._steps[i]
        if stage == 0:
            denoised = self._denoised(model_output, sample, p["sigma"])
            if p["two_stage"]:
                self._pending = sample
                prev = p["ratio_s"] * sample - p["c_s"] * denoised
            else:
                prev = sample + (sample - denoised) / p["sigma"] * (p["sigma_down"] - p["sigma"])
                prev = self._noise(prev, p, generator, s_noise)
        else:
            denoised = self._denoised(model_output, sample, p["sigma_s"])
            prev = p["ratio_next"] * self._pending - p["c_next"] * denoised
            self._pending = None
            prev = self._noise(prev, p, generator, s_noise)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def __len__(self):
        return self.config.num_train_timesteps

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
    # DPMSolverSDEScheduler with our Brownian tree noise (BrownianTreeNoiseSamplerV2).
    "dpmpp-sde": (DPMSolverSDEScheduler, {}),
    # k-diffusion's sample_dpmpp_2s_ancestral (DPMPP2SAncestralScheduler above).
    "dpmpp-2s-a": (DPMPP2SAncestralScheduler, {}),
}

# schedule name -> from_config overrides, applied on top of the sampler's.
SCHEDULES = {
    "model": {},
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "sgm_uniform": dict(timestep_spacing="trailing"),
    # A1111's schedules, given to EulerDiscreteScheduler as custom sigmas (a1111_sigmas).
    "simple": {},
    "normal": {},
}
CUSTOM_SIGMA_SCHEDULES = ("simple", "normal")


def a1111_sigmas(sched, schedule, n):
    """A1111's "simple" / "normal" sigmas (modules/sd_schedulers.py) on the scheduler's
    training table sqrt((1 - ac) / ac) (diffusers' float32 alphas_cumprod), with
    k-diffusion's DiscreteSchedule sigma_to_t / t_to_sigma in float32 torch, then 0."""
    ac = sched.alphas_cumprod
    sigmas = ((1 - ac) / ac) ** 0.5
    if schedule == "simple":
        ss = len(sigmas) / n
        return [float(sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0]
    log_sigmas = sigmas.log()

    def sigma_to_t(sigma):
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    start = sigma_to_t(torch.tensor(float(sigmas[-1])))
    end = sigma_to_t(torch.tensor(float(sigmas[0])))
    return [float(t_to_sigma(t)) for t in torch.linspace(start, end, n)] + [0.0]

# The samplers of the first fixtures (the Karras variant of DPM++ 2M is now a schedule).
OLD = ["ddim", "pndm", "euler", "euler-a", "dpmpp-2m", ("dpmpp-2m", "karras")]
NEW = ["heun", "lms", "dpm2", "dpm2-a", "dpmpp-2m-sde", "dpmpp-3m-sde", "unipc", "deis", "ddpm",
       "lcm", "tcd"]
# The samplers without an exact diffusers equivalent (their cases come last in each file).
NEWER = ["dpmpp-sde", "dpmpp-2s-a"]


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
                  for s in SIGMA_SCHEDULE_SAMPLERS if s not in NEWER] + [
    (s, "sgm_uniform") for s in TRAILING_SAMPLERS if s not in NEWER]
NEWER_SCHEDULE_PAIRS = [(s, sch) for s in NEWER
                        for sch in ("karras", "exponential", "beta", "sgm_uniform")]
assert all(s in SIGMA_SCHEDULE_SAMPLERS and s in TRAILING_SAMPLERS for s in NEWER)
# A1111's simple / normal: only EulerDiscreteScheduler takes custom sigmas.
CUSTOM_SIGMA_PAIRS = [("euler", sch) for sch in CUSTOM_SIGMA_SCHEDULES]

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
# The SDE samplers' step argument s_noise (scale of the fresh noise; 1 by default).
S_NOISE = {"s_noise": 0.7}

FIXTURES = {
    "sd15": (SD15, cases(OLD, (1, 2, 7, 20))
             + cases(["pndm", "euler-a", ("dpmpp-2m", "karras")], (50,))
             + cases(NEW, (1, 2, 7, 20))
             + cases([p for p in SCHEDULE_PAIRS if p != ("dpmpp-2m", "karras")], (7,))
             + [("tcd", "model", n, TCD_DEFAULT_ETA) for n in (2, 7)]
             + cases(NEWER, (1, 2, 7, 20)) + cases(NEWER_SCHEDULE_PAIRS, (7,))
             + cases(CUSTOM_SIGMA_PAIRS, (1, 7, 20))
             + [(s, "model", 7, S_NOISE) for s in NEWER]),
    "sd21_v": (SD21_V, cases(OLD, (2, 7, 20))
               + cases(NEW, (2, 7))
               + cases([p for p in SCHEDULE_PAIRS if p != ("dpmpp-2m", "karras")], (7,))
               + [("tcd", "model", 7, TCD_DEFAULT_ETA)]
               + cases(NEWER, (2, 7)) + cases(NEWER_SCHEDULE_PAIRS, (7,))
               + cases(CUSTOM_SIGMA_PAIRS, (7,))),
    "sdxl": (SDXL, cases(OLD, (7, 20)) + cases(NEW, (2, 7)) + cases(NEWER, (2, 7))
             + cases(CUSTOM_SIGMA_PAIRS, (7,))),
    "zsnr_trailing_v": (ZSNR_TRAILING_V, cases(OLD, (3, 7)) + cases(NEW, (2, 7))
                        + cases(NEWER, (2, 7)) + cases(CUSTOM_SIGMA_PAIRS, (7,))),
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


# Recorded in the cases of the samplers whose reference is not diffusers' own.
CASE_NOTES = {
    "dpmpp-sde": {"noise": "brownian-tree-v2"},
    "dpmpp-2s-a": {
        "reference": "k-diffusion sample_dpmpp_2s_ancestral (scripts/make_sampler_fixtures.py)"
    },
}


def f32s(t):
    """A float32 tensor as a flat list of floats with 9 significant digits (round-trips)."""
    return [float("%.9g" % v) for v in t.detach().reshape(-1).numpy().astype(np.float32)]


def coeff(i):
    return float(np.float32(0.3 + 0.01 * i))


def run_case(config, sampler, schedule, steps, extra):
    cls, overrides = SAMPLERS[sampler]
    head = {"sampler": sampler, "schedule": schedule, "steps": steps, **CASE_NOTES.get(sampler, {})}

    def refused(stage, e, **more):
        # Diffusers refuses the combination; we must refuse it too.
        return {**head, "error": str(e), "error_type": type(e).__name__, "error_at": stage, **more}

    try:
        sched = cls.from_config(config, **{**overrides, **SCHEDULES[schedule]})
    except Exception as e:  # noqa: BLE001 (recorded)
        return refused("from_config", e)
    try:
        if schedule in CUSTOM_SIGMA_SCHEDULES:
            sched.set_timesteps(sigmas=a1111_sigmas(sched, schedule, steps))
        else:
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
    set_brownian_generator(g)  # (dpmpp-sde: the root seed of its noise is drawn from g)
    if "generator" in step_params:
        kwargs["generator"] = g
    if "s_noise" in extra:
        kwargs["s_noise"] = head["s_noise"] = extra["s_noise"]
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
    if isinstance(getattr(sched, "noise_sampler", None), BrownianTreeNoiseSamplerV2):
        # (dpmpp-sde: the tree's root seed, as drawn from g at the first step.)
        case["noise_root"] = sched.noise_sampler.root
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
