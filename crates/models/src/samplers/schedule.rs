//! Noise-schedule arithmetic shared by the samplers: betas, `alphas_cumprod`, timestep
//! spacings, sigma interpolation and the Karras schedule.
//!
//! diffusers computes these with a mix of float32 torch tensors and float64 numpy arrays;
//! each helper says which one it mirrors, so that the resulting float32 tables equal
//! diffusers' to the last bit where we could make them (and to ~1 ulp where numpy's
//! vectorised float32 `log` is involved).

use candle_core::{DType, Tensor};

use super::config::BetaDefaults;
use super::{SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: the step is a float32
/// division, the first half counts up from `start` and the second half down from `end`,
/// each value one fused multiply-add (as torch's build compiles it).
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `np.linspace(start, stop, num)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for float64 arguments: numpy writes `start`,
/// `start + step`, then `start + i * delta` with `delta = (start + step) - start`.
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)` with float32 table values, computed in float64.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last {
        return f64::from(fp[n - 1]);
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if xj == x {
        return y0;
    }
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - xj) + y0;
    if r.is_nan() {
        let r2 = slope * (x - (xj + 1.0)) + y1;
        if r2.is_nan() && y0 == y1 {
            return y0;
        }
        return r2;
    }
    r
}

/// float32 `torch.cumprod`: torch's CPU kernel accumulates in float64 and rounds each output.
fn cumprod(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= f64::from(a);
            acc as f32
        })
        .collect()
}

/// The betas of a config, as diffusers' scheduler `__init__` builds them (float32); absent
/// keys take the class's defaults `d`.
fn betas(cfg: &SchedulerConfig, d: BetaDefaults) -> Result<Vec<f32>> {
    let beta_start = cfg.beta_start.unwrap_or(d.start);
    let beta_end = cfg.beta_end.unwrap_or(d.end);
    let n = cfg.num_train_timesteps;
    if let Some(tb) = &cfg.trained_betas {
        if tb.len() != n {
            return Err(Error::config(
                &cfg.path,
                format!(
                    "trained_betas has {} values but num_train_timesteps is {n}",
                    tb.len()
                ),
            ));
        }
        return Ok(tb.iter().map(|&b| b as f32).collect());
    }
    match cfg.beta_schedule.as_deref().unwrap_or(d.schedule) {
        "linear" => Ok(torch_linspace_f32(beta_start as f32, beta_end as f32, n)),
        "scaled_linear" => {
            Ok(
                torch_linspace_f32(beta_start.powf(0.5) as f32, beta_end.powf(0.5) as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
            )
        }
        "squaredcos_cap_v2" => Ok(betas_for_alpha_bar(n)),
        other => Err(Error::config(
            &cfg.path,
            format!(
                "beta_schedule {other:?} is not supported \
                 (supported: linear, scaled_linear, squaredcos_cap_v2, or trained_betas)"
            ),
        )),
    }
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (Python floats, then float32).
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powf(2.0)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, in float32 like its torch code.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut s: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else {
        return betas.to_vec();
    };
    let scale = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v -= st;
        *v *= scale;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// `alphas_cumprod` (float32) as the scheduler's `__init__` computes it. `rescale` is the
/// scheduler's `rescale_betas_zero_snr` (PNDM has no such option and passes `false`);
/// `terminal_floor` sets the last value to 2^-24 after rescaling, as the sigma-based
/// schedulers (Euler, Euler ancestral, DPM-Solver) do and DDIM does not.
pub(crate) fn alphas_cumprod(
    cfg: &SchedulerConfig,
    defaults: BetaDefaults,
    rescale: bool,
    terminal_floor: bool,
) -> Result<Vec<f32>> {
    let mut b = betas(cfg, defaults)?;
    if rescale {
        b = rescale_zero_terminal_snr(&b);
    }
    let alphas: Vec<f32> = b.iter().map(|&b| 1.0 - b).collect();
    let mut ac = cumprod(&alphas);
    if rescale && terminal_floor {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(ac)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32 (ascending in t).
pub(crate) fn sigmas_from_alphas_cumprod(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// The float32 `log_sigmas` table used by `_sigma_to_t` (numpy float32 `log`; we round the
/// float64 logarithm, numpy's vectorised float32 log can differ by 1 ulp).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| f64::from(s).ln() as f32).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma` by linear
/// interpolation in log-sigma.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the last index where dists >= 0, or 0 if there is none.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - f64::from(ls) >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = (f64::from(low) - log_sigma) / f64::from(low - high);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_convert_to_karras` (rho = 7), float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// The sigma schedules diffusers offers on top of a scheduler's own (`use_karras_sigmas`,
/// `use_exponential_sigmas`, `use_beta_sigmas`), as the config flags select them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SigmaConversion {
    Karras,
    Exponential,
    Beta,
}

impl SigmaConversion {
    /// The conversion a config's flags ask for (diffusers tests them in this order), if any.
    pub(crate) fn from_config(cfg: &SchedulerConfig) -> Option<Self> {
        if cfg.use_karras_sigmas {
            Some(SigmaConversion::Karras)
        } else if cfg.use_exponential_sigmas {
            Some(SigmaConversion::Exponential)
        } else if cfg.use_beta_sigmas {
            Some(SigmaConversion::Beta)
        } else {
            None
        }
    }

    /// diffusers' `_convert_to_karras` / `_convert_to_exponential` / `_convert_to_beta`:
    /// `n` sigmas from the config's `sigma_max` / `sigma_min` when it sets them, else from
    /// `in_sigmas[0]` and `in_sigmas[last]` (descending input; float64 throughout).
    pub(crate) fn convert(self, cfg: &SchedulerConfig, in_sigmas: &[f64], n: usize) -> Vec<f64> {
        let sigma_min = cfg
            .sigma_min
            .unwrap_or_else(|| in_sigmas.last().copied().unwrap_or(0.0));
        let sigma_max = cfg
            .sigma_max
            .unwrap_or_else(|| in_sigmas.first().copied().unwrap_or(0.0));
        match self {
            SigmaConversion::Karras => karras_sigmas(sigma_min, sigma_max, n),
            SigmaConversion::Exponential => exponential_sigmas(sigma_min, sigma_max, n),
            SigmaConversion::Beta => beta_sigmas(sigma_min, sigma_max, n, 0.6, 0.6),
        }
    }
}

/// A1111's `simple` schedule (`modules/sd_schedulers.py`): every `len / n`-th training sigma
/// from the top, then 0; `sigmas` is the float32 training table, ascending.
pub(crate) fn simple_sigmas(sigmas: &[f32], n: usize) -> Vec<f32> {
    let len = sigmas.len();
    let ss = len as f64 / n as f64;
    (0..n)
        .map(|x| sigmas[len - 1 - ((x as f64 * ss) as usize).min(len - 1)])
        .chain(std::iter::once(0.0))
        .collect()
}

/// A1111's `normal` schedule: timesteps evenly spaced (float32 `torch.linspace`) from the
/// timestep of the largest training sigma to that of the smallest, mapped back to sigmas by
/// k-diffusion's `t_to_sigma`, then 0.
pub(crate) fn normal_sigmas(sigmas: &[f32], n: usize) -> Vec<f32> {
    let log_sigmas: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
    let (Some(&min), Some(&max)) = (sigmas.first(), sigmas.last()) else {
        return vec![0.0];
    };
    let start = kd_sigma_to_t(max, &log_sigmas);
    let end = kd_sigma_to_t(min, &log_sigmas);
    torch_linspace_f32(start, end, n)
        .into_iter()
        .map(|t| kd_t_to_sigma(t, &log_sigmas))
        .chain(std::iter::once(0.0))
        .collect()
}

/// k-diffusion's `DiscreteSchedule.sigma_to_t` (float32, not quantised).
fn kd_sigma_to_t(sigma: f32, log_sigmas: &[f32]) -> f32 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.ln();
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f32 + w * (low_idx + 1) as f32
}

/// k-diffusion's `DiscreteSchedule.t_to_sigma`: log-linear between the neighbouring
/// training sigmas (float32).
fn kd_t_to_sigma(t: f32, log_sigmas: &[f32]) -> f32 {
    let last = log_sigmas.len().saturating_sub(1);
    let low = (t.floor().max(0.0) as usize).min(last);
    let high = (t.ceil().max(0.0) as usize).min(last);
    let w = t - t.trunc();
    ((1.0 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
}

/// `np.exp(np.linspace(log(sigma_max), log(sigma_min), n))`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// diffusers' `_convert_to_beta`: `sigma_min + ppf(1 - r) (sigma_max - sigma_min)` for `r`
/// in `linspace(0, 1, n)`, `ppf` the Beta(alpha, beta) quantile (scipy's `beta.ppf`).
pub(crate) fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize, a: f64, b: f64) -> Vec<f64> {
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| sigma_min + beta_ppf(1.0 - r, a, b) * (sigma_max - sigma_min))
        .collect()
}

/// The Beta(a, b) quantile: the `x` with regularized incomplete beta `I_x(a, b) = p`, by
/// bisection to the last bit (statrs has the CDF; its own inverse stops at a looser
/// tolerance than scipy's, which the sigma schedule inherits).
pub(crate) fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if statrs::function::beta::beta_reg(a, b, mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The timesteps and sigmas of the k-diffusion ports (`HeunDiscreteScheduler`,
/// `LMSDiscreteScheduler`, `KDPM2DiscreteScheduler`, ...): float timesteps by the config's
/// spacing, sigmas interpolated linearly in the training table, optionally converted
/// (Karras / exponential / beta) with the timesteps then recomputed from the sigmas.
/// Returns float32 timesteps, the float64 sigmas (without the final 0), the float32
/// training sigmas (ascending) and their logarithms.
pub(crate) struct DiscreteSigmas {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f64>,
    pub log_sigmas: Vec<f32>,
}

pub(crate) fn discrete_sigmas(
    cfg: &SchedulerConfig,
    ac: &[f32],
    spacing: TimestepSpacing,
    n: usize,
) -> DiscreteSigmas {
    let full = sigmas_from_alphas_cumprod(ac);
    let log_sigmas = log_sigmas(&full);
    let mut timesteps = float_timesteps(spacing, cfg.num_train_timesteps, n, cfg.steps_offset);
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| np_interp(f64::from(t), &full))
        .collect();
    if let Some(conversion) = SigmaConversion::from_config(cfg) {
        sigmas = conversion.convert(cfg, &sigmas, n);
        timesteps = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
            .collect();
    }
    DiscreteSigmas {
        timesteps,
        sigmas,
        log_sigmas,
    }
}

/// Integer timesteps of DDIM / PNDM-style spacing, in descending loop order, as numpy
/// computes them in `set_timesteps` (before any scheduler-specific reshuffling).
pub(crate) fn int_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange_f64(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// Float timesteps of the Euler-family `set_timesteps` (numpy float32), descending.
pub(crate) fn float_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange_f64(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|v| v.round_ties_even() as f32 - 1.0)
                .collect()
        }
    }
}

/// Checks that every timestep indexes the `alphas_cumprod` table.
pub(crate) fn check_timesteps_in_range(
    cfg: &SchedulerConfig,
    what: &str,
    timesteps: impl IntoIterator<Item = i64>,
) -> Result<()> {
    let n = cfg.num_train_timesteps as i64;
    for t in timesteps {
        if t < 0 || t >= n {
            return Err(Error::config(
                &cfg.path,
                format!(
                    "{what}: timestep {t} is outside the training range 0..{n} \
                     (check timestep_spacing / steps_offset)"
                ),
            ));
        }
    }
    Ok(())
}

/// `tensor * c` for a float32 scalar `c` (exactly torch's float32 multiplication).
pub(crate) fn mul(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(f64::from(c), 0.0)?)
}

/// `tensor / c` for a float32 scalar `c` (a true division, as torch does; not a multiply by
/// the reciprocal).
pub(crate) fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    let d = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&d)?)
}

/// The tensor as float32 (diffusers' samplers upcast `sample` to float32).
pub(crate) fn f32_tensor(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// `sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise` at timestep `t` (diffusers'
/// `add_noise` of the alpha-based samplers), in float32.
pub(crate) fn add_noise_alpha(
    alphas_cumprod: &[f32],
    t: usize,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let a = *alphas_cumprod.get(t).ok_or_else(|| {
        Error::invalid(
            "steps",
            format!("timestep {t} is outside the trained range"),
        )
    })?;
    let (x, n) = (f32_tensor(original)?, f32_tensor(noise)?);
    Ok((mul(&x, a.sqrt())? + mul(&n, (1.0 - a).sqrt())?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_matches_numpy_rules() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp(-1.0, &fp), 1.0);
        assert_eq!(np_interp(0.5, &fp), 2.0);
        assert_eq!(np_interp(1.0, &fp), 3.0);
        assert_eq!(np_interp(1.25, &fp), 4.0);
        assert_eq!(np_interp(2.0, &fp), 7.0);
        assert_eq!(np_interp(9.0, &fp), 7.0);
    }

    #[test]
    fn arange_length_and_values() {
        assert_eq!(np_arange_f64(10.0, 0.0, -2.5), vec![10.0, 7.5, 5.0, 2.5]);
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0), vec![1000.0]);
        assert!(np_arange_f64(0.0, 1.0, -1.0).is_empty());
    }

    #[test]
    fn beta_ppf_matches_scipy() {
        // scipy.stats.beta.ppf(q, 0.6, 0.6) (scipy 1.17.1).
        for (q, want) in [
            (0.5, 0.500_000_000_000_000_1),
            (0.1, 0.039_584_405_588_780_85),
            (0.9, 0.960_415_594_411_219_2),
            (0.25, 0.175_680_378_652_694_98),
        ] {
            let got = beta_ppf(q, 0.6, 0.6);
            assert!((got - want).abs() < 1e-12, "ppf({q}) = {got}, want {want}");
        }
        assert_eq!(beta_ppf(0.0, 0.6, 0.6), 0.0);
        assert_eq!(beta_ppf(1.0, 0.6, 0.6), 1.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let ls = [0.0f32, 1.0, 2.0, 3.0];
        assert_eq!(sigma_to_t(1f64.exp(), &ls), 1.0);
        assert!((sigma_to_t(1.5f64.exp(), &ls) - 1.5).abs() < 1e-12);
        assert_eq!(sigma_to_t(1e-3, &ls), 0.0);
        assert_eq!(sigma_to_t(1e3, &ls), 3.0);
    }
}
