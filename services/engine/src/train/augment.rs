//! Per-step augmentation of the instance photos, for methods whose reference training draws a
//! new view of each photo every step (Custom Diffusion's rescaling).
//!
//! The cached latents of [`super::data::LatentSet`] cannot serve such a method: the view changes
//! the pixels, so the VAE must encode them every step, as the reference scripts do. The method
//! hands the trainer an [`Augmentation`] ([`super::method::TrainingMethod::augmentation`]); the
//! run keeps the preprocessed photos ([`AugmentPhotos`]), and the trainer's [`Augmenter`] draws a
//! view of the example, encodes it and weights the example's loss with the view's mask (the
//! trainer's masked-loss path).

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use rand::rngs::StdRng;
use rand::Rng;

use super::data::{resize_center_crop, CaptionedPhoto, PhotoSource};
use super::host::LatentEncoder;
use super::loss::MaskedLossConfig;
use super::rng;
use super::TrainError;

/// One preprocessed photo as an augmentation sees it.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The square photo at the training resolution (resized and centre-cropped).
    pub image: &'a RgbImage,
    /// Its subject mask, resized and cropped with it (masked-loss training).
    pub subject: Option<&'a GrayImage>,
    pub caption: &'a str,
    /// Pixels per latent cell along each side.
    pub latent_factor: u32,
}

/// A drawn view of a photo.
#[derive(Debug, Clone, PartialEq)]
pub struct Augmented {
    /// `[3, R, R]` in `[-1, 1]`, channel-major.
    pub pixels: Vec<f32>,
    pub caption: String,
    /// Loss weights `[R / f, R / f]` in `[0, 1]`: zero where the view holds no photo (and,
    /// with a subject mask, the mask's share of each cell).
    pub weights: Vec<f32>,
}

/// A per-step augmentation of the instance photos.
pub trait Augmentation {
    /// A random view of `view` drawn from `rng`.
    fn apply(&self, view: View<'_>, rng: &mut StdRng) -> Result<Augmented, TrainError>;

    /// How the weighted instance loss is averaged when the run has no masked loss of its own.
    fn loss(&self) -> MaskedLossConfig;
}

/// One photo, preprocessed once, in each orientation the run trains on.
#[derive(Debug, Clone)]
struct Photo {
    image: RgbImage,
    subject: Option<GrayImage>,
    flipped: Option<(RgbImage, Option<GrayImage>)>,
}

/// The instance photos at the training resolution, for an [`Augmenter`].
#[derive(Debug, Clone)]
pub struct AugmentPhotos {
    photos: Vec<Photo>,
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

/// A subject mask resized and cropped as its photo of size `photo` was (as
/// [`super::data::mask_to_latent`] does, before averaging over latent cells).
fn crop_mask(mask: &GrayImage, (w, h): (u32, u32), resolution: u32) -> GrayImage {
    let mask = image::imageops::resize(mask, w, h, FilterType::Nearest);
    let rgb = image::DynamicImage::ImageLuma8(mask).to_rgb8();
    image::DynamicImage::ImageRgb8(resize_center_crop(&rgb, resolution)).to_luma8()
}

impl AugmentPhotos {
    /// Loads `photos` and preprocesses them as [`super::data::LatentSet::prepare`] does (resize,
    /// centre crop, both orientations with `flip`).
    pub fn prepare(
        photos: &[CaptionedPhoto],
        resolution: u32,
        flip: bool,
    ) -> Result<Self, TrainError> {
        let photos = photos
            .iter()
            .map(|p| {
                let original = open(&p.source)?;
                let image = resize_center_crop(&original, resolution);
                let subject = p
                    .mask
                    .as_ref()
                    .map(|m| crop_mask(m, original.dimensions(), resolution));
                let flipped = flip.then(|| {
                    (
                        image::imageops::flip_horizontal(&image),
                        subject.as_ref().map(image::imageops::flip_horizontal),
                    )
                });
                Ok(Photo {
                    image,
                    subject,
                    flipped,
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        Ok(Self { photos })
    }

    pub fn len(&self) -> usize {
        self.photos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.photos.is_empty()
    }
}

/// What the trainer needs to augment its instance examples: the method's augmentation, the
/// photos and the VAE that encodes each view.
#[derive(Clone, Copy)]
pub struct Augmenter<'a> {
    pub augmentation: &'a dyn Augmentation,
    pub photos: &'a AugmentPhotos,
    pub vae: &'a dyn LatentEncoder,
}

impl Augmenter<'_> {
    /// Example `i` as one step trains on it: the orientation (drawn as
    /// [`super::data::LatentSet::sample_with_mask`] draws it), the view, the latent sample of its
    /// VAE encoding (scaled), the view's loss weights `[1, 1, h, w]` and its caption. The
    /// photo's subject mask enters the weights only for a run with a masked loss.
    pub fn sample(
        &self,
        i: usize,
        caption: &str,
        masked_loss: bool,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<(Tensor, Tensor, String), TrainError> {
        let photo = self
            .photos
            .photos
            .get(i)
            .ok_or_else(|| TrainError::Config(format!("no photo {i} to augment")))?;
        let (image, subject) = match &photo.flipped {
            Some((image, subject)) if rng.gen_bool(0.5) => (image, subject),
            _ => (&photo.image, &photo.subject),
        };
        let latent_factor = self.vae.downsampling_factor().unwrap_or(8);
        let view = View {
            image,
            subject: subject.as_ref().filter(|_| masked_loss),
            caption,
            latent_factor,
        };
        let out = self.augmentation.apply(view, rng)?;
        let (w, h) = image.dimensions();
        let pixels = Tensor::from_vec(out.pixels, (1, 3, h as usize, w as usize), device)?;
        let (lh, lw) = ((h / latent_factor) as usize, (w / latent_factor) as usize);
        let weights = Tensor::from_vec(out.weights, (1, 1, lh, lw), device)?;
        let (mean, std) = self.vae.encode_dist(&pixels)?;
        let eps = rng::randn(rng, mean.dims(), mean.device())?;
        let x0 = ((mean + (std * eps)?)? * self.vae.scaling_factor())?;
        Ok((x0, weights, out.caption))
    }
}
