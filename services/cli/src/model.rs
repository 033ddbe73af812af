//! Model selection shared by `sidbooth train` and `sidbooth generate`: a diffusers directory or
//! the built-in tiny model, on a device and in a precision.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use sidbooth_engine::config::Variant;
use sidbooth_engine::pipeline::{LoadOptions, StableDiffusion};
use sidbooth_engine::{tiny::TinyModel, train::adapters::BaseSource};

/// Where the computation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(DeviceSpec::Cpu);
    }
    if s == "cuda" {
        return Ok(DeviceSpec::Cuda(0));
    }
    if let Some(n) = s.strip_prefix("cuda:") {
        return n
            .parse::<usize>()
            .map(DeviceSpec::Cuda)
            .map_err(|_| format!("bad GPU ordinal {n:?} (expected cuda:N, e.g. cuda:0)"));
    }
    Err(format!(
        "unknown device {s:?} (expected cpu, cuda or cuda:N)"
    ))
}

impl DeviceSpec {
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "--device {self}: this sidbooth was built without CUDA support; rebuild with \
                         `cargo build --release -p sidbooth-cli --features cuda`"
                    );
                }
                Device::new_cuda(n).with_context(|| format!("opening GPU {n}"))
            }
        }
    }
}

/// Floating-point precision of the weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Which weight files of a model directory to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VariantArg {
    /// `*.safetensors` (falls back to `*.fp16.safetensors`).
    Full,
    /// `*.fp16.safetensors` (falls back to `*.safetensors`).
    Fp16,
}

/// The base model and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Diffusers-layout model directory (model_index.json, unet/, text_encoder/, vae/,
    /// tokenizer/, scheduler/), e.g. a local copy of stable-diffusion-2-1-base.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "tiny",
        conflicts_with = "tiny"
    )]
    pub model: Option<PathBuf>,
    /// Use the built-in tiny model with weights drawn from SEED instead of --model (runs on the
    /// CPU in seconds; random weights, for trying the commands out).
    #[arg(long, value_name = "SEED")]
    pub tiny: Option<u64>,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
    /// Precision; f16 and bf16 only on a GPU. Default f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Weight files to read from --model.
    #[arg(long, value_enum, default_value = "full")]
    pub variant: VariantArg,
}

/// A loaded pipeline and the name recorded in metadata.
pub struct Loaded {
    pub sd: StableDiffusion,
    /// `--model` as given, or `sidbooth-tiny:SEED`.
    pub name: String,
    /// Where its files are (a DreamBooth pipeline copies the unchanged parts).
    pub source: BaseSource,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let dtype = self.dtype.dtype();
        if self.device == DeviceSpec::Cpu && dtype != DType::F32 {
            bail!(
                "--dtype {:?} needs a GPU (--device cuda); on the CPU only f32 is supported",
                self.dtype
            );
        }
        let device = self.device.open()?;
        match (&self.model, self.tiny) {
            (_, Some(seed)) => {
                let t =
                    TinyModel::build_on(seed, &device, dtype).context("building the tiny model")?;
                Ok(Loaded {
                    sd: t.sd,
                    name: format!("sidbooth-tiny:{seed}"),
                    source: BaseSource::Tiny(seed),
                })
            }
            (Some(dir), None) => {
                if !dir.is_dir() {
                    bail!("--model {}: not a directory", dir.display());
                }
                let variant = match self.variant {
                    VariantArg::Full => Variant::Full,
                    VariantArg::Fp16 => Variant::Fp16,
                };
                let opts = LoadOptions {
                    device,
                    dtype,
                    variant,
                };
                let sd = StableDiffusion::load(dir, &opts)
                    .with_context(|| format!("loading the model from {}", dir.display()))?;
                Ok(Loaded {
                    sd,
                    name: dir.display().to_string(),
                    source: BaseSource::Dir(dir.clone()),
                })
            }
            (None, None) => bail!("give --model DIR or --tiny SEED"),
        }
    }
}

/// Default square resolution of a model: the UNet's `sample_size` times the VAE factor.
pub fn default_resolution(sd: &StableDiffusion) -> usize {
    sd.unet.config.sample_size.unwrap_or(64) * sd.vae_scale()
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!(parse_device("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device("CUDA"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        assert!(parse_device("cuda:x").is_err());
        assert!(parse_device("tpu").is_err());
    }
}
