//! Training data: photos preprocessed once into `[-1, 1]` tensors and their VAE latent
//! distributions cached once.
//!
//! Preprocessing follows diffusers' DreamBooth dataset: resize so the shorter side equals the
//! resolution (bilinear with antialiasing), centre crop, scale to `[-1, 1]`. With `flip`, both
//! orientations are cached and each training step picks one at random (probability 1/2, drawn
//! from the step's generator), like `RandomHorizontalFlip`.
//!
//! Latents: the mean and standard deviation of the VAE's latent distribution are cached; each
//! step draws `mean + std * eps` with the step's generator and multiplies by the scaling factor,
//! which is what `train_dreambooth_lora.py` computes (`latent_dist.sample()` every step) without
//! re-running the encoder.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::Rng;

use super::host::LatentEncoder;
use super::rng;
use super::TrainError;

/// Where a photo comes from.
#[derive(Debug, Clone)]
pub enum PhotoSource {
    Path(PathBuf),
    Image(RgbImage),
}

/// One photo with its caption (the training description).
#[derive(Debug, Clone)]
pub struct CaptionedPhoto {
    pub source: PhotoSource,
    pub caption: String,
}

impl CaptionedPhoto {
    pub fn from_path(path: impl Into<PathBuf>, caption: impl Into<String>) -> Self {
        Self {
            source: PhotoSource::Path(path.into()),
            caption: caption.into(),
        }
    }
}

fn open(source: &PhotoSource) -> Result<RgbImage, TrainError> {
    match source {
        PhotoSource::Image(img) => Ok(img.clone()),
        PhotoSource::Path(p) => {
            image::open(p)
                .map(|i| i.to_rgb8())
                .map_err(|e| TrainError::Image {
                    path: p.display().to_string(),
                    msg: e.to_string(),
                })
        }
    }
}

/// Resize so the shorter side is `resolution` (torchvision `Resize(int)` rounding), then centre
/// crop to `resolution x resolution` (torchvision `CenterCrop` offsets).
pub fn resize_center_crop(img: &RgbImage, resolution: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (
            resolution,
            ((resolution as u64 * h as u64) / w as u64) as u32,
        )
    } else {
        (
            ((resolution as u64 * w as u64) / h as u64) as u32,
            resolution,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, FilterType::Triangle)
    };
    let left = ((nw - resolution) as f64 / 2.0).round() as u32;
    let top = ((nh - resolution) as f64 / 2.0).round() as u32;
    image::imageops::crop_imm(&resized, left, top, resolution, resolution).to_image()
}

/// `[1, 3, H, W]` f32 in `[-1, 1]`.
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor, TrainError> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            data[c * h * w + y as usize * w + x as usize] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}

/// Loads and preprocesses one photo into `[1, 3, R, R]` in `[-1, 1]`.
pub fn preprocess(
    source: &PhotoSource,
    resolution: u32,
    flip: bool,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let img = resize_center_crop(&open(source)?, resolution);
    let img = if flip {
        image::imageops::flip_horizontal(&img)
    } else {
        img
    };
    image_to_tensor(&img, device)
}

/// Cached latent distribution of one orientation of a photo.
#[derive(Debug, Clone)]
pub struct LatentDist {
    /// `[1, C, h, w]`, before the scaling factor.
    pub mean: Tensor,
    pub std: Tensor,
}

/// One training example: caption and cached latents.
#[derive(Debug, Clone)]
pub struct Example {
    pub caption: String,
    pub latents: LatentDist,
    pub flipped: Option<LatentDist>,
}

/// Cached examples plus the scaling factor of the VAE that produced them.
#[derive(Debug, Clone)]
pub struct LatentSet {
    pub examples: Vec<Example>,
    pub scaling_factor: f64,
}

impl LatentSet {
    /// Preprocesses `photos` and encodes them with the VAE once (both orientations with `flip`).
    pub fn encode(
        photos: &[CaptionedPhoto],
        vae: &dyn LatentEncoder,
        resolution: u32,
        flip: bool,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if resolution == 0 || resolution % 8 != 0 {
            return Err(TrainError::Config(format!(
                "resolution {resolution} must be a positive multiple of 8"
            )));
        }
        let mut examples = Vec::with_capacity(photos.len());
        for p in photos {
            let enc = |flip: bool| -> Result<LatentDist, TrainError> {
                let px = preprocess(&p.source, resolution, flip, device)?;
                let (mean, std) = vae.encode_dist(&px)?;
                Ok(LatentDist {
                    mean: mean.to_dtype(candle_core::DType::F32)?,
                    std: std.to_dtype(candle_core::DType::F32)?,
                })
            };
            let latents = enc(false)?;
            let flipped = if flip { Some(enc(true)?) } else { None };
            examples.push(Example {
                caption: p.caption.clone(),
                latents,
                flipped,
            });
        }
        Ok(Self {
            examples,
            scaling_factor: vae.scaling_factor(),
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Draws the scaled latents of example `i` with `rng` (orientation, then the sample).
    pub fn sample(&self, i: usize, rng: &mut StdRng) -> Result<Tensor, TrainError> {
        let ex = &self.examples[i];
        let dist = match &ex.flipped {
            Some(f) if rng.gen_bool(0.5) => f,
            _ => &ex.latents,
        };
        let eps = rng::randn(rng, dist.mean.dims(), dist.mean.device())?;
        Ok(((&dist.mean + (&dist.std * eps)?)? * self.scaling_factor)?)
    }
}

/// Image files of a directory (jpg, jpeg, png, webp), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .map(|e| {
                    matches!(
                        e.to_ascii_lowercase().as_str(),
                        "jpg" | "jpeg" | "png" | "webp"
                    )
                })
                .unwrap_or(false)
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_crop_geometry() {
        let img = RgbImage::from_fn(40, 20, |x, _| image::Rgb([(x * 6) as u8, 0, 255]));
        let out = resize_center_crop(&img, 8);
        assert_eq!(out.dimensions(), (8, 8));
        // Centre crop of a horizontal ramp keeps the middle: mean red near the image mean.
        let mean: f64 = out.pixels().map(|p| p.0[0] as f64).sum::<f64>() / 64.0;
        assert!((mean - 117.0).abs() < 15.0, "{mean}");
        let t = image_to_tensor(&out, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 8, 8]);
        let blue = t
            .get(0)
            .unwrap()
            .get(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(blue.iter().all(|v| (*v - 1.0).abs() < 1e-6));
        let green = t
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(green.iter().all(|v| (*v + 1.0).abs() < 1e-6));
    }

    #[test]
    fn flip_mirrors() {
        let img = RgbImage::from_fn(8, 8, |x, _| image::Rgb([x as u8 * 30, 0, 0]));
        let a = preprocess(&PhotoSource::Image(img.clone()), 8, false, &Device::Cpu).unwrap();
        let b = preprocess(&PhotoSource::Image(img), 8, true, &Device::Cpu).unwrap();
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a[0], b[7]);
        assert_ne!(a[0], b[0]);
    }
}
