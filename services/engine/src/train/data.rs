//! Training data: photos preprocessed once and their VAE latent distributions encoded once, on
//! first use.
//!
//! Preprocessing follows diffusers' DreamBooth dataset: resize so the shorter side equals the
//! resolution (bilinear with antialiasing), centre crop, scale to `[-1, 1]`. With `flip`, both
//! orientations can be drawn and each training step picks one at random (probability 1/2, drawn
//! from the step's generator), like `RandomHorizontalFlip`.
//!
//! Latents: the mean and standard deviation of the VAE's latent distribution are kept; each
//! step draws `mean + std * eps` with the step's generator and multiplies by the scaling factor,
//! which is what `train_dreambooth_lora.py` computes (`latent_dist.sample()` every step) without
//! re-running the encoder.
//!
//! A photo may carry a subject mask (masked-loss training): it is resized and cropped with the
//! photo, then averaged over each latent cell (`F.interpolate(mode="area")`, as kohya and
//! OneTrainer do), giving a `[1, 1, h, w]` weight in [0, 1] that follows the photo's flip.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
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

/// One photo with its caption (the training description) and, for masked-loss training, its
/// subject mask (255 = subject; any size of the photo's shape).
#[derive(Debug, Clone)]
pub struct CaptionedPhoto {
    pub source: PhotoSource,
    pub caption: String,
    pub mask: Option<GrayImage>,
}

impl CaptionedPhoto {
    pub fn from_path(path: impl Into<PathBuf>, caption: impl Into<String>) -> Self {
        Self {
            source: PhotoSource::Path(path.into()),
            caption: caption.into(),
            mask: None,
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

/// A subject mask resized and cropped as its photo was, then averaged over blocks of `factor`
/// pixels (the VAE's downsampling): `[1, 1, R/factor, R/factor]` in [0, 1].
pub fn mask_to_latent(
    mask: &GrayImage,
    (photo_w, photo_h): (u32, u32),
    resolution: u32,
    factor: u32,
    flip: bool,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let mask = image::imageops::resize(mask, photo_w, photo_h, FilterType::Nearest);
    let gray = image::DynamicImage::ImageLuma8(mask).to_rgb8();
    let cropped = resize_center_crop(&gray, resolution);
    let cropped = if flip {
        image::imageops::flip_horizontal(&cropped)
    } else {
        cropped
    };
    let n = (resolution / factor) as usize;
    let f = factor as usize;
    let mut cells = vec![0f32; n * n];
    for (x, y, p) in cropped.enumerate_pixels() {
        let (cx, cy) = (x as usize / f, y as usize / f);
        if cx < n && cy < n {
            cells[cy * n + cx] += p.0[0] as f32 / 255.0;
        }
    }
    let area = (f * f) as f32;
    cells.iter_mut().for_each(|c| *c /= area);
    Ok(Tensor::from_vec(cells, (1, 1, n, n), device)?)
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

/// Latent distribution of one orientation of a photo.
#[derive(Debug, Clone)]
pub struct LatentDist {
    /// `[1, C, h, w]`, before the scaling factor.
    pub mean: Tensor,
    pub std: Tensor,
}

/// One training example: caption, the photo resized and cropped, its latent distributions once
/// encoded and, with a subject mask, its latent-sized weights (for each orientation).
pub struct Example {
    pub caption: String,
    pixels: RgbImage,
    /// Unflipped, then flipped.
    latents: [OnceLock<LatentDist>; 2],
    mask: Option<Tensor>,
    flipped_mask: Option<Tensor>,
}

/// The examples of a run plus the VAE that encodes them.
///
/// Photos are opened, resized and cropped up front (a broken photo fails the run before any
/// step), but each orientation is encoded only when a step first draws it, then kept: a short
/// run over many photos encodes only what it trains on, and no run encodes anything twice.
/// Encoding is deterministic, so when it happens does not change any result.
pub struct LatentSet {
    examples: Vec<Example>,
    vae: Arc<dyn LatentEncoder + Send + Sync>,
    flip: bool,
    device: Device,
    scaling_factor: f64,
}

impl LatentSet {
    /// Preprocesses `photos` (and their masks) for training at `resolution` on `device`; with
    /// `flip`, each draw picks one orientation at random.
    pub fn prepare<E: LatentEncoder + Clone + Send + Sync + 'static>(
        photos: &[CaptionedPhoto],
        vae: &E,
        resolution: u32,
        flip: bool,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if resolution == 0 || resolution % 8 != 0 {
            return Err(TrainError::Config(format!(
                "resolution {resolution} must be a positive multiple of 8"
            )));
        }
        let factor = vae.downsampling_factor().unwrap_or(8);
        let mut examples = Vec::with_capacity(photos.len());
        for p in photos {
            let img = open(&p.source)?;
            let mask_for = |flip: bool| -> Result<Option<Tensor>, TrainError> {
                p.mask
                    .as_ref()
                    .map(|m| mask_to_latent(m, img.dimensions(), resolution, factor, flip, device))
                    .transpose()
            };
            examples.push(Example {
                caption: p.caption.clone(),
                mask: mask_for(false)?,
                flipped_mask: if flip { mask_for(true)? } else { None },
                pixels: resize_center_crop(&img, resolution),
                latents: Default::default(),
            });
        }
        Ok(Self {
            examples,
            vae: Arc::new(vae.clone()),
            flip,
            device: device.clone(),
            scaling_factor: vae.scaling_factor(),
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    pub fn caption(&self, i: usize) -> &str {
        &self.examples[i].caption
    }

    pub fn captions(&self) -> impl Iterator<Item = &str> {
        self.examples.iter().map(|e| e.caption.as_str())
    }

    /// The latent distribution of example `i` in one orientation, encoded on first use.
    pub fn dist(&self, i: usize, flipped: bool) -> Result<&LatentDist, TrainError> {
        let ex = &self.examples[i];
        let cell = &ex.latents[flipped as usize];
        if let Some(d) = cell.get() {
            return Ok(d);
        }
        let img = if flipped {
            image::imageops::flip_horizontal(&ex.pixels)
        } else {
            ex.pixels.clone()
        };
        let (mean, std) = self
            .vae
            .encode_dist(&image_to_tensor(&img, &self.device)?)?;
        let dist = LatentDist {
            mean: mean.to_dtype(candle_core::DType::F32)?,
            std: std.to_dtype(candle_core::DType::F32)?,
        };
        // Another thread may have encoded it meanwhile: either value is the same.
        Ok(cell.get_or_init(|| dist))
    }

    /// `[1, 1, h, w]` loss weights of example `i` in one orientation, if it has a mask.
    pub fn mask(&self, i: usize, flipped: bool) -> Option<&Tensor> {
        let ex = &self.examples[i];
        if flipped {
            ex.flipped_mask.as_ref()
        } else {
            ex.mask.as_ref()
        }
    }

    /// Draws the scaled latents of example `i` with `rng` (orientation, then the sample).
    pub fn sample(&self, i: usize, rng: &mut StdRng) -> Result<Tensor, TrainError> {
        Ok(self.sample_with_mask(i, rng)?.0)
    }

    /// [`sample`](Self::sample) and the example's mask in the drawn orientation.
    pub fn sample_with_mask(
        &self,
        i: usize,
        rng: &mut StdRng,
    ) -> Result<(Tensor, Option<Tensor>), TrainError> {
        let flipped = self.flip && rng.gen_bool(0.5);
        let dist = self.dist(i, flipped)?;
        let eps = rng::randn(rng, dist.mean.dims(), dist.mean.device())?;
        let x = ((&dist.mean + (&dist.std * eps)?)? * self.scaling_factor)?;
        Ok((x, self.mask(i, flipped).cloned()))
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
