//! diffusers' `DDIMScheduler` (eta = 0) and the training noise schedule.

use candle_core::{DType, Result, Tensor};

use crate::config::SchedulerConfig;

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            o => Err(format!("unsupported prediction_type {o}")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// DDIM sampler and noise schedule.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    pub config: SchedulerConfig,
    pub prediction: Prediction,
    pub spacing: Spacing,
    /// `alphas_cumprod[t]` for `t` in `0..num_train_timesteps` (computed in f32 like torch).
    pub alphas_cumprod: Vec<f64>,
    pub final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
}

fn betas_for_alpha_bar(n: usize, max_beta: f64) -> Vec<f64> {
    let f = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - f(t2) / f(t1)).min(max_beta)
        })
        .collect()
}

/// `torch.linspace(a, b, n, dtype=float32)` values.
fn linspace_f32(a: f64, b: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![a as f32];
    }
    let step = (b - a) / (n - 1) as f64;
    // torch computes a + i*step for the first half and b - (n-1-i)*step for the second half
    (0..n)
        .map(|i| {
            if i < n / 2 {
                (a + step * i as f64) as f32
            } else {
                (b - step * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig) -> crate::Result<Self> {
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = if let Some(tb) = &config.trained_betas {
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match config.beta_schedule.as_str() {
                "linear" => linspace_f32(config.beta_start, config.beta_end, n),
                "scaled_linear" => {
                    linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                "squaredcos_cap_v2" => betas_for_alpha_bar(n, 0.999)
                    .into_iter()
                    .map(|b| b as f32)
                    .collect(),
                o => {
                    return Err(crate::Error::Config(format!(
                        "unsupported beta_schedule {o}"
                    )))
                }
            }
        };
        // cumprod in f32 as torch does
        let mut acc = 1f32;
        let mut alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f64
            })
            .collect();
        if config.rescale_betas_zero_snr {
            // diffusers' DDIM keeps the terminal ᾱ at exactly 0 (meant for v-prediction)
            alphas_cumprod = rescale_zero_terminal_snr(&alphas_cumprod);
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let prediction =
            Prediction::parse(&config.prediction_type).map_err(crate::Error::Config)?;
        let spacing = match config.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            o => {
                return Err(crate::Error::Config(format!(
                    "unsupported timestep_spacing {o}"
                )))
            }
        };
        Ok(Self {
            config: config.clone(),
            prediction,
            spacing,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            num_inference_steps: 0,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// Chooses the `n` inference timesteps (descending), as diffusers' `set_timesteps`.
    pub fn set_timesteps(&mut self, n: usize) -> crate::Result<()> {
        let t = self.config.num_train_timesteps;
        if n == 0 || n > t {
            return Err(crate::Error::Invalid(format!(
                "num_inference_steps {n} must be in 1..={t}"
            )));
        }
        self.num_inference_steps = n;
        self.timesteps = match self.spacing {
            Spacing::Linspace => {
                let v = linspace_f32(0.0, (t - 1) as f64, n);
                v.iter().rev().map(|x| x.round() as usize).collect()
            }
            Spacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| i * ratio + self.config.steps_offset)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / n as f64;
                let mut v = Vec::new();
                let mut x = t as f64;
                while x > 0.0 {
                    v.push((x.round() as i64 - 1).max(0) as usize);
                    x -= ratio;
                }
                v
            }
        };
        Ok(())
    }

    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Scale of the initial noise (1 for DDIM).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// One DDIM step (eta = 0): from `sample` at `timestep` to the previous timestep.
    pub fn step(&self, model_output: &Tensor, timestep: usize, sample: &Tensor) -> Result<Tensor> {
        if self.num_inference_steps == 0 {
            candle_core::bail!("DDIM: call set_timesteps first");
        }
        let prev =
            timestep as i64 - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[timestep];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - model_output.affine(b_t.sqrt(), 0.0)?)? / a_t.sqrt())?;
                (x0, model_output.clone())
            }
            Prediction::Sample => {
                let eps = ((sample - model_output.affine(a_t.sqrt(), 0.0)?)? / b_t.sqrt())?;
                (model_output.clone(), eps)
            }
            Prediction::VPrediction => {
                let x0 =
                    (sample.affine(a_t.sqrt(), 0.0)? - model_output.affine(b_t.sqrt(), 0.0)?)?;
                let eps =
                    (model_output.affine(a_t.sqrt(), 0.0)? + sample.affine(b_t.sqrt(), 0.0)?)?;
                (x0, eps)
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let dir = eps.affine((1.0 - a_prev).sqrt(), 0.0)?;
        x0.affine(a_prev.sqrt(), 0.0)? + dir
    }

    fn per_sample(&self, t: &Tensor, f: impl Fn(f64) -> f64, like: &Tensor) -> Result<Tensor> {
        let ts: Vec<i64> = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        let vals: Vec<f32> = ts
            .iter()
            .map(|&i| f(self.alphas_cumprod[i as usize]) as f32)
            .collect();
        let b = vals.len();
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, like.rank() - 1));
        Tensor::from_vec(vals, shape, like.device())?.to_dtype(like.dtype())
    }

    /// `sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) noise`, `t` a `[B]` tensor of integer timesteps.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        let a = self.per_sample(t, |a| a.sqrt(), x0)?;
        let s = self.per_sample(t, |a| (1.0 - a).sqrt(), x0)?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// v-prediction target `sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        let a = self.per_sample(t, |a| a.sqrt(), x0)?;
        let s = self.per_sample(t, |a| (1.0 - a).sqrt(), x0)?;
        noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?
    }

    /// The training target for the configured prediction type.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => self.velocity(x0, noise, t),
            Prediction::Sample => Ok(x0.clone()),
        }
    }
}

fn rescale_zero_terminal_snr(ac: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = ac.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    for v in s.iter_mut() {
        *v = (*v - st) * s0 / (s0 - st);
    }
    s.iter().map(|v| v * v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_cfg() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear","set_alpha_to_one":false,"steps_offset":1,"clip_sample":false}"#,
        )
        .unwrap()
    }

    #[test]
    fn leading_spacing_matches_diffusers() {
        let mut s = DdimScheduler::new(&sd_cfg()).unwrap();
        s.set_timesteps(50).unwrap();
        let t = s.timesteps();
        assert_eq!(t.len(), 50);
        assert_eq!(t[0], 981);
        assert_eq!(t[49], 1);
        s.set_timesteps(10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
        );
    }

    #[test]
    fn trailing_and_linspace_spacing() {
        let mut c = sd_cfg();
        c.timestep_spacing = "trailing".into();
        let mut s = DdimScheduler::new(&c).unwrap();
        s.set_timesteps(10).unwrap();
        assert_eq!(
            s.timesteps(),
            &[999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        c.timestep_spacing = "linspace".into();
        let mut s = DdimScheduler::new(&c).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999, 666, 333, 0]);
    }

    #[test]
    fn scaled_linear_alphas() {
        let s = DdimScheduler::new(&sd_cfg()).unwrap();
        // values of diffusers' DDIMScheduler for SD (float32)
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-6);
        assert!(
            (s.alphas_cumprod[999] - 0.0046601).abs() < 1e-6,
            "{}",
            s.alphas_cumprod[999]
        );
        assert_eq!(s.final_alpha_cumprod, s.alphas_cumprod[0]);
    }

    #[test]
    fn other_schedules_match_diffusers() {
        // values printed by diffusers 0.42 DDIMScheduler
        let close = |a: f64, b: f64, tol: f64| {
            assert!((a - b).abs() <= tol * b.abs().max(1e-12), "{a} vs {b}")
        };
        let mut c = sd_cfg();
        c.rescale_betas_zero_snr = true;
        c.timestep_spacing = "trailing".into();
        c.prediction_type = "v_prediction".into();
        let mut s = DdimScheduler::new(&c).unwrap();
        s.set_timesteps(7).unwrap();
        assert_eq!(s.timesteps(), &[999, 856, 713, 570, 428, 285, 142]);
        close(s.alphas_cumprod[500], 0.2410186380147934, 1e-5);
        close(s.alphas_cumprod[998], 1.9679633567193378e-07, 1e-3);
        assert!(s.alphas_cumprod[999].abs() < 1e-12);
        let mut s = DdimScheduler::new(&SchedulerConfig::default()).unwrap();
        s.set_timesteps(3).unwrap();
        assert_eq!(s.timesteps(), &[666, 333, 0]);
        close(s.alphas_cumprod[999], 4.035830352222547e-05, 1e-4);
        close(s.alphas_cumprod[300], 0.3940110206604004, 1e-6);
        let c: SchedulerConfig =
            serde_json::from_str(r#"{"beta_schedule":"squaredcos_cap_v2"}"#).unwrap();
        let s = DdimScheduler::new(&c).unwrap();
        close(s.alphas_cumprod[999], 2.4287349909002387e-09, 1e-3);
        close(s.alphas_cumprod[300], 0.7856324315071106, 1e-6);
    }

    #[test]
    fn step_recovers_x0_with_exact_noise() -> Result<()> {
        // with the true noise as prediction, a step to t_prev equals add_noise(x0, noise, t_prev)
        let dev = candle_core::Device::Cpu;
        let mut s = DdimScheduler::new(&sd_cfg()).unwrap();
        s.set_timesteps(10).unwrap();
        let x0 = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev)?;
        let n = Tensor::randn(0f32, 1.0, (1, 4, 2, 2), &dev)?;
        let xt = s.add_noise(&x0, &n, &Tensor::new(&[501i64], &dev)?)?;
        let prev = s.step(&n, 501, &xt)?;
        let want = s.add_noise(&x0, &n, &Tensor::new(&[401i64], &dev)?)?;
        let d = (prev - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        // v-prediction: the velocity target also gives the exact step
        let mut c = sd_cfg();
        c.prediction_type = "v_prediction".into();
        let mut s = DdimScheduler::new(&c).unwrap();
        s.set_timesteps(10).unwrap();
        let v = s.velocity(&x0, &n, &Tensor::new(&[501i64], &dev)?)?;
        let prev = s.step(&v, 501, &xt)?;
        let d = (prev - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        Ok(())
    }
}
