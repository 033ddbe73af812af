//! Learning-rate schedules: linear warm-up, then constant or cosine decay.
//! Same shapes as diffusers' `get_scheduler("constant_with_warmup" | "cosine")`.

/// Shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrDecay {
    #[default]
    Constant,
    /// Half a cosine from the base rate down to zero at `total_steps`.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub decay: LrDecay,
    /// Number of optimizer steps of the run (the cosine reaches zero there).
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn constant(base_lr: f64) -> Self {
        Self {
            base_lr,
            warmup_steps: 0,
            decay: LrDecay::Constant,
            total_steps: 0,
        }
    }

    /// Learning rate of the optimizer update with index `step` (0-based), as
    /// `LambdaLR` evaluates it before its first `scheduler.step()`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        match self.decay {
            LrDecay::Constant => self.base_lr,
            LrDecay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_constant() {
        let s = LrSchedule {
            base_lr: 1e-4,
            warmup_steps: 4,
            decay: LrDecay::Constant,
            total_steps: 10,
        };
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(2) - 5e-5).abs() < 1e-15);
        assert_eq!(s.lr_at(4), 1e-4);
        assert_eq!(s.lr_at(1000), 1e-4);
    }

    #[test]
    fn cosine_goes_to_zero() {
        let s = LrSchedule {
            base_lr: 1.0,
            warmup_steps: 2,
            decay: LrDecay::Cosine,
            total_steps: 12,
        };
        assert!((s.lr_at(2) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(7) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(12).abs() < 1e-12);
        assert!(s.lr_at(5) > s.lr_at(6));
    }
}
