//! The training loop, shared by all methods.
//!
//! One optimizer step = `grad_accum` micro-batches of `batch_size` examples. For micro-batch `i`
//! (counted over the whole run) everything random - which examples, their orientation, the latent
//! sample, the noise and the timesteps - comes from generators derived from `(seed, i)`, so the
//! run is a pure function of the seed and a resumed run repeats an uninterrupted one exactly.
//!
//! Loss (diffusers' `train_dreambooth_lora.py`): MSE between the UNet output and the noise (or
//! the velocity); with prior preservation, the class examples go through the same forward pass
//! and add `prior_loss_weight * MSE`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::Rng;

use super::augment::Augmenter;
use super::checkpoint::{self, CheckpointState};
use super::data::LatentSet;
use super::host::{Denoiser, NoiseSchedule, PromptEncoder};
pub use super::loss::{MaskNormalization, MaskedLossConfig};
use super::method::{ModelsMut, TrainingMethod};
use super::optim::{self, AdamW, AdamWConfig};
use super::rng::{self, Stream};
use super::schedule::LrSchedule;
use super::TrainError;
use crate::recompute::GradSink;

/// Where a run starts.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resume {
    /// From the base model.
    #[default]
    No,
    /// From the newest checkpoint in the checkpoint directory, or from scratch if there is none
    /// (what a restarted worker does).
    Latest,
    /// From this checkpoint directory.
    From(PathBuf),
}

/// Settings of the loop (method-independent).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoopConfig {
    pub seed: u64,
    /// Optimizer steps of the whole run.
    pub max_steps: u64,
    pub batch_size: usize,
    pub grad_accum: u32,
    pub lr: LrSchedule,
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm (diffusers' default is 1.0).
    pub max_grad_norm: Option<f64>,
    /// Weight of the class-prior loss (used when class examples are given).
    pub prior_loss_weight: f64,
    /// Restrict the instance loss to the examples' masks.
    pub masked_loss: Option<MaskedLossConfig>,
    /// Recompute the UNet's resnets and transformers (and the text encoder's layers, when a
    /// gradient passes through it) in the backward pass instead of keeping their activations
    /// ([`crate::recompute`]): less memory for about one more forward pass.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Write a checkpoint every this many optimizer steps (0: never).
    pub checkpoint_every: u64,
    pub checkpoint_dir: Option<PathBuf>,
    /// Keep only the newest this many checkpoints (0: keep all).
    pub keep_checkpoints: usize,
    pub resume: Resume,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            max_steps: 1000,
            batch_size: 1,
            grad_accum: 1,
            lr: LrSchedule::constant(1e-4),
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            prior_loss_weight: 1.0,
            masked_loss: None,
            gradient_checkpointing: false,
            checkpoint_every: 0,
            checkpoint_dir: None,
            keep_checkpoints: 0,
            resume: Resume::No,
        }
    }
}

/// Reported after every optimizer step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepReport {
    /// Optimizer steps completed (1-based).
    pub step: u64,
    pub max_steps: u64,
    /// Total loss, averaged over the micro-batches of the step.
    pub loss: f64,
    pub instance_loss: f64,
    pub prior_loss: Option<f64>,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Progress callbacks and the cancel flag.
#[derive(Default)]
pub struct Callbacks<'a> {
    pub on_step: Option<Box<dyn FnMut(&StepReport) + Send + 'a>>,
    pub on_checkpoint: Option<Box<dyn FnMut(u64, &Path) + Send + 'a>>,
    /// Checked before every step; when set, the loop stops with [`LoopOutcome::Canceled`].
    pub cancel: Option<Arc<AtomicBool>>,
}

impl<'a> Callbacks<'a> {
    pub fn on_step(mut self, f: impl FnMut(&StepReport) + Send + 'a) -> Self {
        self.on_step = Some(Box::new(f));
        self
    }
    pub fn on_checkpoint(mut self, f: impl FnMut(u64, &Path) + Send + 'a) -> Self {
        self.on_checkpoint = Some(Box::new(f));
        self
    }
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
}

/// How the loop ended.
#[derive(Debug, Clone, PartialEq)]
pub enum LoopOutcome {
    Completed {
        steps: u64,
        last_loss: Option<f64>,
        last_checkpoint: Option<PathBuf>,
    },
    Canceled {
        steps: u64,
        last_loss: Option<f64>,
        last_checkpoint: Option<PathBuf>,
    },
}

impl LoopOutcome {
    pub fn steps(&self) -> u64 {
        match self {
            Self::Completed { steps, .. } | Self::Canceled { steps, .. } => *steps,
        }
    }
}

/// What the loop trains on. The method's parameters must already be attached to the models,
/// which the loop hands back to the method before every forward pass
/// ([`TrainingMethod::prepare`]).
pub struct TrainInputs<'a> {
    pub unet: &'a mut dyn Denoiser,
    pub text_encoder: &'a mut dyn PromptEncoder,
    pub schedule: &'a NoiseSchedule,
    pub method: &'a dyn TrainingMethod,
    pub instance: &'a LatentSet,
    /// Class images for prior preservation.
    pub class: Option<&'a LatentSet>,
}

/// What one micro-batch trains on: scaled latents `x0` (instances first, then class examples),
/// the noise, the timesteps, the captions, and each instance's loss mask at latent resolution.
#[derive(Debug, Clone)]
pub struct Batch {
    pub x0: Tensor,
    pub noise: Tensor,
    pub timesteps: Vec<u32>,
    pub captions: Vec<String>,
    /// One per example; class examples have none.
    pub masks: Vec<Option<Tensor>>,
    /// How many of the examples (at the end) are class examples.
    pub class_count: usize,
}

/// Loss of one micro-batch, with the graph for backpropagation.
pub struct MicroLoss {
    pub loss: Tensor,
    pub instance_loss: f64,
    pub prior_loss: Option<f64>,
}

/// The training state: inputs, optimizer, cached prompt embeddings, step counter.
pub struct Trainer<'a> {
    inputs: TrainInputs<'a>,
    cfg: LoopConfig,
    params: Vec<(String, Var)>,
    opt: AdamW,
    prompt_cache: HashMap<String, Tensor>,
    step: u64,
    last_loss: Option<f64>,
    last_checkpoint: Option<PathBuf>,
    /// Per-step views of the instance photos (see [`Trainer::with_augmentation`]).
    augment: Option<Augmenter<'a>>,
    /// With gradient checkpointing, where the recomputed blocks' weight gradients arrive.
    recompute: Option<Arc<GradSink>>,
}

fn mse(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .sqr()?
        .mean_all()
}

fn encode_prompt(
    text: &dyn PromptEncoder,
    prompt: &str,
    dev: &candle_core::Device,
) -> Result<Tensor, TrainError> {
    let ids = text.tokenize(prompt)?;
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), dev)?;
    Ok(text.encode_ids(&ids)?)
}

impl<'a> Trainer<'a> {
    /// Creates the optimizer over the method's trainable parameters, caches prompt embeddings
    /// when the text encoder is frozen, and resumes from a checkpoint when asked.
    pub fn new(inputs: TrainInputs<'a>, cfg: LoopConfig) -> Result<Self, TrainError> {
        if inputs.instance.is_empty() {
            return Err(TrainError::Config("no training photos".into()));
        }
        if cfg.batch_size == 0 || cfg.grad_accum == 0 {
            return Err(TrainError::Config(
                "batch_size and grad_accum must be at least 1".into(),
            ));
        }
        if inputs.class.is_some_and(|c| c.is_empty()) {
            return Err(TrainError::Config(
                "prior preservation needs at least one class image".into(),
            ));
        }
        if cfg.checkpoint_every > 0 && cfg.checkpoint_dir.is_none() {
            return Err(TrainError::Config(
                "checkpoint_every needs checkpoint_dir".into(),
            ));
        }
        let params = inputs.method.trainable();
        if params.is_empty() {
            return Err(TrainError::Config(
                "the method has no trainable parameters (not attached?)".into(),
            ));
        }
        let opt = AdamW::new(params.iter().cloned(), cfg.adamw.clone())?;
        let recompute = cfg
            .gradient_checkpointing
            .then(|| Arc::new(GradSink::default()));
        if let Some(sink) = &recompute {
            inputs.unet.set_gradient_checkpointing(Some(sink.clone()))?;
            // A frozen text encoder's prompts are encoded once, outside any graph; one that a
            // gradient passes through keeps its layers' activations unless they are recomputed.
            if inputs.method.trains_text_encoder() {
                inputs
                    .text_encoder
                    .set_gradient_checkpointing(Some(sink.clone()))?;
            }
        }
        let mut prompt_cache = HashMap::new();
        if !inputs.method.trains_text_encoder() {
            inputs.method.prepare(ModelsMut {
                unet: &mut *inputs.unet,
                text_encoder: &mut *inputs.text_encoder,
            })?;
            let dev = inputs.instance.device().clone();
            let captions = inputs
                .instance
                .captions()
                .chain(inputs.class.into_iter().flat_map(|c| c.captions()));
            for c in captions {
                if !prompt_cache.contains_key(c) {
                    let emb = encode_prompt(&*inputs.text_encoder, c, &dev)?.detach();
                    prompt_cache.insert(c.to_string(), emb);
                }
            }
        }
        let mut t = Self {
            inputs,
            cfg,
            params,
            opt,
            prompt_cache,
            step: 0,
            last_loss: None,
            last_checkpoint: None,
            augment: None,
            recompute,
        };
        t.maybe_resume()?;
        Ok(t)
    }

    /// Trains on a new view of each instance photo every step, drawn by the method's
    /// augmentation and encoded by the VAE that step, with the instance loss weighted by the
    /// view's mask: by the run's masked-loss setting if it has one (the view's mask then also
    /// holds the subject mask), else as the augmentation says.
    pub fn with_augmentation(mut self, augmenter: Augmenter<'a>) -> Result<Self, TrainError> {
        if augmenter.photos.len() != self.inputs.instance.len() {
            return Err(TrainError::Config(format!(
                "{} photos to augment for {} training examples",
                augmenter.photos.len(),
                self.inputs.instance.len()
            )));
        }
        if self
            .cfg
            .masked_loss
            .is_some_and(|m| m.unmasked_weight > 0.0)
        {
            // The weight would also apply where the view holds no photo (its padding).
            return Err(TrainError::Config(
                "a masked loss with unmasked_weight > 0 cannot be combined with the method's \
                 augmentation"
                    .into(),
            ));
        }
        self.augment = Some(augmenter);
        Ok(self)
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Settings that must be equal for a checkpoint to be resumed.
    fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            "instance_examples": self.inputs.instance.len(),
            "class_examples": self.inputs.class.map(|c| c.len()),
            "prior_loss_weight": self.cfg.prior_loss_weight,
            "masked_loss": self.cfg.masked_loss,
            "prediction": self.inputs.schedule.prediction,
        })
    }

    fn maybe_resume(&mut self) -> Result<(), TrainError> {
        let dir = match &self.cfg.resume {
            Resume::No => return Ok(()),
            Resume::From(p) => p.clone(),
            Resume::Latest => {
                let Some(root) = &self.cfg.checkpoint_dir else {
                    return Err(TrainError::Config(
                        "resume from latest needs checkpoint_dir".into(),
                    ));
                };
                match checkpoint::latest(root)? {
                    Some(p) => p,
                    None => return Ok(()),
                }
            }
        };
        let dev = self.params[0].1.device().clone();
        let ck = checkpoint::load(&dir, &dev)?;
        if ck.state.seed != self.cfg.seed {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint seed {} differs from run seed {}",
                ck.state.seed, self.cfg.seed
            )));
        }
        if ck.state.method != self.inputs.method.settings_json() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint method settings {} differ from {}",
                ck.state.method,
                self.inputs.method.settings_json()
            )));
        }
        if ck.state.fingerprint != self.fingerprint() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint data/loop settings {} differ from {}",
                ck.state.fingerprint,
                self.fingerprint()
            )));
        }
        self.inputs.method.load_trainable(&ck.trainable)?;
        self.opt.import_state(&ck.optimizer, ck.state.step)?;
        self.step = ck.state.step;
        self.last_loss = ck.state.last_loss;
        self.last_checkpoint = Some(ck.dir);
        Ok(())
    }

    fn contexts(&self, captions: &[&str]) -> Result<Tensor, TrainError> {
        let dev = self.inputs.instance.device().clone();
        let mut out = Vec::with_capacity(captions.len());
        for c in captions {
            match self.prompt_cache.get(*c) {
                Some(t) => out.push(t.clone()),
                None => out.push(encode_prompt(&*self.inputs.text_encoder, c, &dev)?),
            }
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Example index at sample position `k` of an endless, per-epoch shuffled sequence.
    fn pick(&self, set_len: usize, k: u64, stream_offset: u64) -> usize {
        let n = set_len as u64;
        let epoch = k / n;
        let perm = rng::permutation(
            &mut rng::rng_for(self.cfg.seed, Stream::Shuffle, stream_offset + epoch),
            set_len,
        );
        perm[(k % n) as usize]
    }

    /// The examples, noise and timesteps of micro-batch `index` (counted over the whole run),
    /// all drawn from generators derived from `(seed, index)`.
    pub fn batch(&self, index: u64) -> Result<Batch, TrainError> {
        let bs = self.cfg.batch_size;
        let mut r = rng::rng_for(self.cfg.seed, Stream::Step, index);
        let inst = self.inputs.instance;
        let mut latents = Vec::new();
        let mut captions = Vec::new();
        let mut masks = Vec::new();
        for b in 0..bs {
            let i = self.pick(inst.len(), index * bs as u64 + b as u64, 0);
            let caption = inst.caption(i);
            let (x, mask, caption) = match &self.augment {
                Some(a) => {
                    let dev = inst.device();
                    let masked = self.cfg.masked_loss.is_some();
                    let (x, weights, caption) = a.sample(i, caption, masked, &mut r, dev)?;
                    (x, Some(weights), caption)
                }
                None => {
                    let (x, mask) = inst.sample_with_mask(i, &mut r)?;
                    (x, mask, caption.to_string())
                }
            };
            latents.push(x);
            masks.push(mask);
            captions.push(caption);
        }
        let mut class_count = 0;
        if let Some(class) = self.inputs.class {
            for b in 0..bs {
                let i = self.pick(class.len(), index * bs as u64 + b as u64, 1 << 40);
                latents.push(class.sample(i, &mut r)?);
                masks.push(None);
                captions.push(class.caption(i).to_string());
                class_count += 1;
            }
        }
        let x0 = Tensor::cat(&latents, 0)?;
        let noise = rng::randn(&mut r, x0.dims(), x0.device())?;
        let t_max = self.inputs.schedule.num_train_timesteps() as u32;
        let timesteps: Vec<u32> = (0..x0.dims()[0]).map(|_| r.gen_range(0..t_max)).collect();
        Ok(Batch {
            x0,
            noise,
            timesteps,
            captions,
            masks,
            class_count,
        })
    }

    /// The loss of micro-batch `index`, with its graph.
    pub fn micro_loss(&mut self, index: u64) -> Result<MicroLoss, TrainError> {
        let batch = self.batch(index)?;
        self.loss_on(&batch)
    }

    /// The loss of a given batch, with its graph (parity tests feed the batch of a reference
    /// implementation). The method first puts its current weights into the models.
    pub fn loss_on(&mut self, batch: &Batch) -> Result<MicroLoss, TrainError> {
        self.inputs.method.prepare(ModelsMut {
            unet: &mut *self.inputs.unet,
            text_encoder: &mut *self.inputs.text_encoder,
        })?;
        let noisy = self
            .inputs
            .schedule
            .add_noise(&batch.x0, &batch.noise, &batch.timesteps)?;
        let target = self
            .inputs
            .schedule
            .target(&batch.x0, &batch.noise, &batch.timesteps)?;
        let captions: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
        let ctx = self.contexts(&captions)?;
        let pred = self.inputs.unet.predict(&noisy, &batch.timesteps, &ctx)?;
        let n = batch.x0.dims()[0];
        let instances = n - batch.class_count;
        let inst_loss = self.instance_loss(
            &pred.narrow(0, 0, instances)?,
            &target.narrow(0, 0, instances)?,
            &batch.masks[..instances],
        )?;
        if batch.class_count > 0 {
            let prior_loss = mse(
                &pred.narrow(0, instances, batch.class_count)?,
                &target.narrow(0, instances, batch.class_count)?,
            )?;
            let loss = (&inst_loss + (&prior_loss * self.cfg.prior_loss_weight)?)?;
            Ok(MicroLoss {
                loss,
                instance_loss: inst_loss.to_scalar::<f32>()? as f64,
                prior_loss: Some(prior_loss.to_scalar::<f32>()? as f64),
            })
        } else {
            let v = inst_loss.to_scalar::<f32>()? as f64;
            Ok(MicroLoss {
                loss: inst_loss,
                instance_loss: v,
                prior_loss: None,
            })
        }
    }

    /// MSE of the instance examples; with a masked loss, weighted by each example's mask
    /// (outside it by `unmasked_weight`) and normalised as the setting says. Examples without a
    /// mask count everywhere.
    fn instance_loss(
        &self,
        pred: &Tensor,
        target: &Tensor,
        masks: &[Option<Tensor>],
    ) -> Result<Tensor, TrainError> {
        let augmented = self.augment.as_ref().map(|a| a.augmentation.loss());
        let Some(masked) = &self.cfg.masked_loss.or(augmented) else {
            return Ok(mse(pred, target)?);
        };
        let mut total: Option<Tensor> = None;
        for (i, mask) in masks.iter().enumerate() {
            let p = pred.narrow(0, i, 1)?;
            let t = target.narrow(0, i, 1)?;
            let l = match mask {
                None => mse(&p, &t)?,
                Some(m) => masked.loss(&p, &t, m)?,
            };
            total = Some(match total {
                None => l,
                Some(acc) => (acc + l)?,
            });
        }
        let total = total.ok_or_else(|| TrainError::Config("an empty batch".into()))?;
        Ok((total / masks.len() as f64)?)
    }

    /// Gradients of `loss` for every trainable parameter (by name). A parameter outside the
    /// graph is an error.
    pub fn gradients(&self, loss: &Tensor) -> Result<HashMap<String, Tensor>, TrainError> {
        let store = loss.backward()?;
        // With checkpointing, the weights inside recomputed blocks got theirs in the sink.
        let mut recomputed = self
            .recompute
            .as_ref()
            .map(|s| s.take())
            .unwrap_or_default();
        let mut out = HashMap::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let inner = recomputed.remove(&var.as_tensor().id());
            let g = match (store.get(var.as_tensor()), inner) {
                (Some(g), Some(i)) => Some((g + i)?),
                (g, i) => g.cloned().or(i),
            };
            match g {
                Some(g) => {
                    out.insert(name.clone(), g.to_dtype(DType::F32)?);
                }
                None => {
                    return Err(TrainError::Config(format!(
                        "trainable parameter {name} gets no gradient"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// One optimizer step (all micro-batches). Returns its report.
    pub fn train_step(&mut self) -> Result<StepReport, TrainError> {
        let accum = self.cfg.grad_accum as u64;
        let mut sum: Option<HashMap<String, Tensor>> = None;
        let (mut loss_sum, mut inst_sum, mut prior_sum) = (0.0, 0.0, None::<f64>);
        for m in 0..accum {
            let ml = self.micro_loss(self.step * accum + m)?;
            let loss = (&ml.loss / accum as f64)?;
            let grads = self.gradients(&loss)?;
            loss_sum += ml.loss.to_scalar::<f32>()? as f64;
            inst_sum += ml.instance_loss;
            if let Some(p) = ml.prior_loss {
                prior_sum = Some(prior_sum.unwrap_or(0.0) + p);
            }
            sum = Some(match sum {
                None => grads,
                Some(mut acc) => {
                    for (k, g) in grads {
                        let a = acc.remove(&k).expect("same parameter set");
                        acc.insert(k, (a + g)?);
                    }
                    acc
                }
            });
        }
        let mut grads = sum.expect("grad_accum >= 1");
        let grad_norm = match self.cfg.max_grad_norm {
            Some(max) => optim::clip_grad_norm(&mut grads, max)?,
            None => optim::global_norm(grads.values())?,
        };
        let lr = self.cfg.lr.lr_at(self.step);
        let method = self.inputs.method;
        self.opt
            .step_with(&grads, |name| method.learning_rate(name, lr))?;
        self.inputs.method.after_step()?;
        self.step += 1;
        let n = accum as f64;
        let report = StepReport {
            step: self.step,
            max_steps: self.cfg.max_steps,
            loss: loss_sum / n,
            instance_loss: inst_sum / n,
            prior_loss: prior_sum.map(|p| p / n),
            lr,
            grad_norm,
        };
        self.last_loss = Some(report.loss);
        Ok(report)
    }

    /// Writes a checkpoint of the current state into the checkpoint directory.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let root = self
            .cfg
            .checkpoint_dir
            .clone()
            .ok_or_else(|| TrainError::Config("no checkpoint_dir".into()))?;
        let trainable: BTreeMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let (opt_state, opt_step) = self.opt.export_state();
        debug_assert_eq!(opt_step, self.step);
        let state = CheckpointState::new(
            self.step,
            self.cfg.seed,
            self.inputs.method.settings_json(),
            self.fingerprint(),
            self.last_loss,
        );
        let dir = checkpoint::save(&root, &state, &trainable, &opt_state)?;
        if self.cfg.keep_checkpoints > 0 {
            checkpoint::prune(&root, self.cfg.keep_checkpoints)?;
        }
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Runs until `max_steps`, the cancel flag, or an error.
    pub fn run(&mut self, cb: &mut Callbacks<'_>) -> Result<LoopOutcome, TrainError> {
        while self.step < self.cfg.max_steps {
            if cb.cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst)) {
                return Ok(LoopOutcome::Canceled {
                    steps: self.step,
                    last_loss: self.last_loss,
                    last_checkpoint: self.last_checkpoint.clone(),
                });
            }
            let report = self.train_step()?;
            if !report.loss.is_finite() {
                return Err(TrainError::Config(format!(
                    "loss became {} at step {}",
                    report.loss, report.step
                )));
            }
            if let Some(f) = cb.on_step.as_mut() {
                f(&report);
            }
            if self.cfg.checkpoint_every > 0 && self.step % self.cfg.checkpoint_every == 0 {
                let dir = self.save_checkpoint()?;
                if let Some(f) = cb.on_checkpoint.as_mut() {
                    f(self.step, &dir);
                }
            }
        }
        Ok(LoopOutcome::Completed {
            steps: self.step,
            last_loss: self.last_loss,
            last_checkpoint: self.last_checkpoint.clone(),
        })
    }
}

/// Mean loss over a fixed evaluation set: for each example, `per_example` (noise, timestep)
/// pairs drawn from `(seed, example)` on the latent mean. No parameters change; used to
/// compare a model before and after training.
pub fn eval_loss(
    unet: &dyn Denoiser,
    text_encoder: &dyn PromptEncoder,
    schedule: &NoiseSchedule,
    set: &LatentSet,
    seed: u64,
    per_example: usize,
) -> Result<f64, TrainError> {
    let mut total = 0.0;
    let mut n = 0usize;
    for i in 0..set.len() {
        let mut r = rng::rng_for(seed, Stream::Eval, i as u64);
        let x0 = (&set.dist(i, false)?.mean * set.scaling_factor())?;
        let ctx = encode_prompt(text_encoder, set.caption(i), x0.device())?.detach();
        for _ in 0..per_example {
            let noise = rng::randn(&mut r, x0.dims(), x0.device())?;
            let t = [r.gen_range(0..schedule.num_train_timesteps() as u32)];
            let noisy = schedule.add_noise(&x0, &noise, &t)?;
            let target = schedule.target(&x0, &noise, &t)?;
            let pred = unet.predict(&noisy, &t, &ctx)?.detach();
            total += mse(&pred, &target)?.to_scalar::<f32>()? as f64;
            n += 1;
        }
    }
    Ok(total / n.max(1) as f64)
}
