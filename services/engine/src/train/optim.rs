//! AdamW with exportable state, and gradient clipping by global norm.
//!
//! The update follows `torch.optim.AdamW` (decoupled weight decay, bias-corrected
//! moments, `eps` added after the square root). The state (first and second moments
//! of every parameter and the step count) can be exported and imported, so a run
//! resumed from a checkpoint continues exactly.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Result, Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The defaults of diffusers' DreamBooth scripts (`adam_weight_decay = 1e-2`).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a named set of variables.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: u64,
}

/// Suffixes of the exported optimizer tensors.
pub const EXP_AVG: &str = "exp_avg";
pub const EXP_AVG_SQ: &str = "exp_avg_sq";

impl AdamW {
    /// Creates the optimizer with zero moments for every variable.
    pub fn new(params: impl IntoIterator<Item = (String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, var) in params {
            let m = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
            let v = m.clone();
            if slots.insert(name.clone(), Slot { var, m, v }).is_some() {
                candle_core::bail!("AdamW: parameter {name} given twice");
            }
        }
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(|s| s.as_str())
    }

    /// One update with learning rate `lr`. `grads` maps parameter names to their
    /// gradients; a parameter without gradient is an error (it would silently stop
    /// learning).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.cfg.beta1.powi(t);
        let bc2 = 1.0 - self.cfg.beta2.powi(t);
        for (name, slot) in self.slots.iter_mut() {
            let g = match grads.get(name) {
                Some(g) => g.to_dtype(DType::F32)?,
                None => candle_core::bail!("AdamW: no gradient for parameter {name}"),
            };
            let p = slot.var.as_tensor();
            let p_dtype = p.dtype();
            let p32 = p.to_dtype(DType::F32)?;
            slot.m = ((&slot.m * self.cfg.beta1)? + (&g * (1.0 - self.cfg.beta1))?)?;
            slot.v = ((&slot.v * self.cfg.beta2)? + (g.sqr()? * (1.0 - self.cfg.beta2))?)?;
            let m_hat = (&slot.m / bc1)?;
            let denom = ((&slot.v / bc2)?.sqrt()? + self.cfg.eps)?;
            let decayed = (&p32 * (1.0 - lr * self.cfg.weight_decay))?;
            let next = (decayed - ((m_hat / denom)? * lr)?)?;
            slot.var.set(&next.to_dtype(p_dtype)?)?;
        }
        Ok(())
    }

    /// The state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) and the step.
    pub fn export_state(&self) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for (name, slot) in &self.slots {
            out.insert(format!("{name}.{EXP_AVG}"), slot.m.clone());
            out.insert(format!("{name}.{EXP_AVG_SQ}"), slot.v.clone());
        }
        (out, self.step)
    }

    /// Restores a state written by [`AdamW::export_state`]. Every parameter must be present.
    pub fn import_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (name, slot) in self.slots.iter_mut() {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                match state.get(&key) {
                    Some(t) => {
                        if t.dims() != slot.var.dims() {
                            candle_core::bail!(
                                "AdamW state {key}: shape {:?}, parameter has {:?}",
                                t.dims(),
                                slot.var.dims()
                            )
                        }
                        t.to_dtype(DType::F32)?.to_device(slot.var.device())
                    }
                    None => candle_core::bail!("AdamW state lacks {key}"),
                }
            };
            slot.m = get(EXP_AVG)?;
            slot.v = get(EXP_AVG_SQ)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of a set of gradients.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales the gradients in place so that their global norm is at most `max_norm`
/// (as `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads.values())?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on p = [1, -2] with constant gradient [0.5, 0.25], compared with the
    /// update rule documented for `torch.optim.AdamW` (lr 0.1, weight decay 0.01).
    #[test]
    fn matches_adamw_update_rule() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_slice(&[1f32, -2.0], 2, &dev)?;
        let mut opt = AdamW::new([("p".to_string(), var.clone())], AdamWConfig::default())?;
        let g = Tensor::from_slice(&[0.5f32, 0.25], 2, &dev)?;
        let grads = HashMap::from([("p".to_string(), g)]);
        let lr = 0.1;
        let mut p = [1f64, -2.0];
        let gs = [0.5f64, 0.25];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for t in 1..=2 {
            opt.step(&grads, lr)?;
            for i in 0..2 {
                p[i] *= 1.0 - lr * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * gs[i];
                v[i] = 0.999 * v[i] + 0.001 * gs[i] * gs[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        Ok(())
    }

    #[test]
    fn state_roundtrip_continues_identically() -> Result<()> {
        let dev = Device::Cpu;
        let g1 = Tensor::from_slice(&[0.3f32, -0.1, 0.7], 3, &dev)?;
        let g2 = Tensor::from_slice(&[-0.2f32, 0.4, 0.05], 3, &dev)?;
        let gr = |g: &Tensor| HashMap::from([("w".to_string(), g.clone())]);

        let a = Var::from_slice(&[1f32, 2.0, 3.0], 3, &dev)?;
        let mut oa = AdamW::new([("w".to_string(), a.clone())], AdamWConfig::default())?;
        oa.step(&gr(&g1), 0.01)?;
        oa.step(&gr(&g2), 0.01)?;

        let b = Var::from_slice(&[1f32, 2.0, 3.0], 3, &dev)?;
        let mut ob = AdamW::new([("w".to_string(), b.clone())], AdamWConfig::default())?;
        ob.step(&gr(&g1), 0.01)?;
        let (state, step) = ob.export_state();
        let c = Var::from_tensor(&b.as_tensor().copy()?)?;
        let mut oc = AdamW::new([("w".to_string(), c.clone())], AdamWConfig::default())?;
        oc.import_state(&state, step)?;
        oc.step(&gr(&g2), 0.01)?;
        assert_eq!(
            a.as_tensor().to_vec1::<f32>()?,
            c.as_tensor().to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn missing_gradient_is_an_error() -> Result<()> {
        let var = Var::zeros(2, DType::F32, &Device::Cpu)?;
        let mut opt = AdamW::new([("p".to_string(), var)], AdamWConfig::default())?;
        assert!(opt.step(&HashMap::new(), 0.1).is_err());
        Ok(())
    }

    #[test]
    fn clipping_caps_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::from_slice(&[3f32, 0.0], 2, &dev)?),
            ("b".to_string(), Tensor::from_slice(&[4f32], 1, &dev)?),
        ]);
        let before = clip_grad_norm(&mut grads, 1.0)?;
        assert!((before - 5.0).abs() < 1e-9);
        let after = global_norm(grads.values())?;
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let unchanged = clip_grad_norm(&mut grads, 10.0)?;
        assert!((unchanged - after).abs() < 1e-9);
        Ok(())
    }
}
