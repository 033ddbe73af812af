//! transformers' image processors for CLIP and ViT, read from `preprocessor_config.json`.
//!
//! The reference is the PIL ("slow") processor: `CLIPImageProcessorPil` / `ViTImageProcessorPil`
//! in transformers 5, `CLIPImageProcessor` / `ViTImageProcessor` with `use_fast=False` in 4.x.
//! transformers 5 returns the torchvision ("fast") processor by default, whose antialiased
//! tensor resize gives other pixels than Pillow; the embeddings that papers report (and the
//! parity fixtures) come from the PIL one. Per image, in this order:
//!
//! 1. resize the 8-bit image with Pillow's filter (`resample`) to `size`: `{"shortest_edge": s}`
//!    scales the short side to `s` and the long side to `int(s * long / short)` (truncated), a
//!    `{"height", "width"}` size is taken as is;
//! 2. centre crop to `crop_size` at offsets `(H - h) // 2`, `(W - w) // 2` (floor division, so a
//!    crop larger than the image pads with zeros);
//! 3. rescale: `(pixel as f64 * rescale_factor) as f32`;
//! 4. normalise in f32: `(x - mean) / std` per channel.
//!
//! Images come in as `RgbImage`s: the RGB conversion (`do_convert_rgb`) is the decoder's.
//! [`to_rgb`] does it as transformers does for images with an alpha channel.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::resample::{resize_rgb, Filter};

/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` of transformers.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `IMAGENET_DEFAULT_MEAN` / `IMAGENET_DEFAULT_STD` (DINO's configs name these).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// `IMAGENET_STANDARD_MEAN` / `_STD`, ViTImageProcessor's class defaults.
const STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
const STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];

/// The processor class a config names; it decides the defaults of absent keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessorKind {
    Clip,
    Vit,
}

/// Step 1's target size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    ShortestEdge(u32),
    Exact { height: u32, width: u32 },
}

/// A parsed `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub kind: ProcessorKind,
    pub do_resize: bool,
    pub size: Resize,
    pub resample: Filter,
    pub do_center_crop: bool,
    /// `(height, width)`.
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// A key's value, `None` when absent or `null` (transformers then takes the class default).
fn key<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn as_bool(path: &Path, v: &Value, k: &str, default: bool) -> Result<bool> {
    match key(v, k) {
        None => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| EvalError::config(path, format!("{k} is not a boolean"))),
    }
}

fn as_u32(path: &Path, x: &Value, what: &str) -> Result<u32> {
    x.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| EvalError::config(path, format!("{what} is not a positive integer")))
}

fn as_triple(path: &Path, v: &Value, k: &str, default: [f64; 3]) -> Result<[f64; 3]> {
    let Some(x) = key(v, k) else {
        return Ok(default);
    };
    if let Some(f) = x.as_f64() {
        return Ok([f; 3]);
    }
    let list: Vec<f64> = x
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    <[f64; 3]>::try_from(list).map_err(|_| EvalError::config(path, format!("{k} is not 3 numbers")))
}

/// `get_size_dict`: an int is a square when `square`, else a shortest edge; a dict is read as is.
fn parse_size(path: &Path, x: &Value, what: &str, square: bool) -> Result<Resize> {
    if x.is_number() {
        let n = as_u32(path, x, what)?;
        return Ok(if square {
            Resize::Exact {
                height: n,
                width: n,
            }
        } else {
            Resize::ShortestEdge(n)
        });
    }
    let dim = |k: &str| key(x, k).map(|d| as_u32(path, d, &format!("{what}.{k}")));
    if let Some(longest) = key(x, "longest_edge") {
        return Err(EvalError::config(
            path,
            format!("{what}: longest_edge {longest} is not supported"),
        ));
    }
    match (dim("shortest_edge"), dim("height"), dim("width")) {
        (Some(s), None, None) => Ok(Resize::ShortestEdge(s?)),
        (None, Some(h), Some(w)) => Ok(Resize::Exact {
            height: h?,
            width: w?,
        }),
        _ => Err(EvalError::config(
            path,
            format!("{what} {x} is neither an int, {{shortest_edge}} nor {{height, width}}"),
        )),
    }
}

impl ImageProcessor {
    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| EvalError::config(path, e.to_string()))?;
        Self::from_json(&v, path)
    }

    /// Parses a config's JSON; `path` only names it in errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let class = key(v, "image_processor_type")
            .or_else(|| key(v, "feature_extractor_type"))
            .and_then(Value::as_str)
            .ok_or_else(|| EvalError::config(path, "no image_processor_type"))?;
        let kind = match class.trim_end_matches("Pil").trim_end_matches("Fast") {
            "CLIPImageProcessor" | "CLIPFeatureExtractor" => ProcessorKind::Clip,
            "ViTImageProcessor" | "ViTFeatureExtractor" => ProcessorKind::Vit,
            other => {
                return Err(EvalError::config(
                    path,
                    format!("image processor {other} is not supported"),
                ))
            }
        };
        if as_bool(path, v, "do_pad", false)? {
            return Err(EvalError::config(path, "do_pad is not supported"));
        }
        let clip = kind == ProcessorKind::Clip;
        let square = as_bool(path, v, "default_to_square", !clip)?;
        let size = match key(v, "size") {
            Some(x) => parse_size(path, x, "size", square)?,
            None if clip => Resize::ShortestEdge(224),
            None => Resize::Exact {
                height: 224,
                width: 224,
            },
        };
        let crop_size = match key(v, "crop_size") {
            Some(x) => match parse_size(path, x, "crop_size", true)? {
                Resize::Exact { height, width } => (height, width),
                Resize::ShortestEdge(_) => {
                    return Err(EvalError::config(path, "crop_size needs height and width"))
                }
            },
            None => (224, 224),
        };
        let resample = match key(v, "resample") {
            Some(x) => x
                .as_i64()
                .and_then(Filter::from_pil)
                .ok_or_else(|| EvalError::config(path, format!("resample {x} is not a filter")))?,
            None if clip => Filter::Bicubic,
            None => Filter::Bilinear,
        };
        let rescale_factor = match key(v, "rescale_factor") {
            Some(x) => x
                .as_f64()
                .ok_or_else(|| EvalError::config(path, "rescale_factor is not a number"))?,
            None => 1.0 / 255.0,
        };
        let (mean, std) = if clip {
            (CLIP_MEAN, CLIP_STD)
        } else {
            (STANDARD_MEAN, STANDARD_STD)
        };
        Ok(Self {
            kind,
            do_resize: as_bool(path, v, "do_resize", true)?,
            size,
            resample,
            do_center_crop: as_bool(path, v, "do_center_crop", clip)?,
            crop_size,
            do_rescale: as_bool(path, v, "do_rescale", true)?,
            rescale_factor,
            do_normalize: as_bool(path, v, "do_normalize", true)?,
            image_mean: as_triple(path, v, "image_mean", mean)?,
            image_std: as_triple(path, v, "image_std", std)?,
        })
    }

    /// The config as transformers writes it (for the tiny model directories).
    pub fn to_json(&self) -> Value {
        let size = match self.size {
            Resize::ShortestEdge(s) => serde_json::json!({ "shortest_edge": s }),
            Resize::Exact { height, width } => {
                serde_json::json!({ "height": height, "width": width })
            }
        };
        let class = match self.kind {
            ProcessorKind::Clip => "CLIPImageProcessor",
            ProcessorKind::Vit => "ViTImageProcessor",
        };
        serde_json::json!({
            "image_processor_type": class,
            "do_resize": self.do_resize,
            "size": size,
            "resample": pil_code(self.resample),
            "do_center_crop": self.do_center_crop,
            "crop_size": { "height": self.crop_size.0, "width": self.crop_size.1 },
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        })
    }

    /// `(height, width)` of the tensors this processor outputs for an image of `(height, width)`.
    pub fn output_size(&self, (h, w): (u32, u32)) -> (u32, u32) {
        let resized = if self.do_resize {
            resize_output_size(self.size, (h, w))
        } else {
            (h, w)
        };
        if self.do_center_crop {
            self.crop_size
        } else {
            resized
        }
    }

    /// Steps 1 and 2: the 8-bit image the model sees.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (w, h) = image.dimensions();
        let resized;
        let mut img = image;
        if self.do_resize {
            let (oh, ow) = resize_output_size(self.size, (h, w));
            resized = resize_rgb(image, ow, oh, self.resample);
            img = &resized;
        }
        if !self.do_center_crop {
            return img.clone();
        }
        center_crop(img, self.crop_size)
    }

    /// All four steps into `out` (CHW, `3 * height * width` values of [`output_size`](Self::output_size)).
    pub fn pixel_values_into(&self, image: &RgbImage, out: &mut [f32]) {
        let img = self.resize_and_crop(image);
        let plane = (img.width() * img.height()) as usize;
        assert_eq!(out.len(), 3 * plane, "output buffer of the wrong size");
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                let mut x = if self.do_rescale {
                    (f64::from(p.0[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(p.0[c])
                };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * plane + i] = x;
            }
        }
    }

    /// One image as a `[3, H, W]` f32 tensor.
    pub fn preprocess(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let (h, w) = self.output_size((image.height(), image.width()));
        let mut out = vec![0f32; 3 * (h * w) as usize];
        self.pixel_values_into(image, &mut out);
        Ok(Tensor::from_vec(out, (3, h as usize, w as usize), device)?)
    }

    /// A batch as `[N, 3, H, W]`, the images processed on parallel threads. Every image must
    /// come out at the same size (true whenever the processor crops or resizes to a fixed size).
    pub fn preprocess_batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let Some(first) = images.first() else {
            return Err(EvalError::Invalid("no images to preprocess".into()));
        };
        let (h, w) = self.output_size((first.height(), first.width()));
        for img in images {
            if self.output_size((img.height(), img.width())) != (h, w) {
                return Err(EvalError::Invalid(format!(
                    "images of {}x{} and {}x{} give tensors of different sizes",
                    first.width(),
                    first.height(),
                    img.width(),
                    img.height()
                )));
            }
        }
        let per = 3 * (h * w) as usize;
        let mut out = vec![0f32; per * images.len()];
        let threads = candle_core::utils::get_num_threads().clamp(1, images.len());
        let chunk = images.len().div_ceil(threads);
        std::thread::scope(|s| {
            for (imgs, buf) in images.chunks(chunk).zip(out.chunks_mut(chunk * per)) {
                s.spawn(move || {
                    for (img, o) in imgs.iter().zip(buf.chunks_mut(per)) {
                        self.pixel_values_into(img, o);
                    }
                });
            }
        });
        Ok(Tensor::from_vec(
            out,
            (images.len(), 3, h as usize, w as usize),
            device,
        )?)
    }
}

fn pil_code(f: Filter) -> i64 {
    match f {
        Filter::Nearest => 0,
        Filter::Lanczos => 1,
        Filter::Bilinear => 2,
        Filter::Bicubic => 3,
        Filter::Box => 4,
        Filter::Hamming => 5,
    }
}

/// `get_resize_output_image_size(default_to_square=False)` for a shortest edge: `(height, width)`.
pub fn resize_output_size(size: Resize, (h, w): (u32, u32)) -> (u32, u32) {
    match size {
        Resize::Exact { height, width } => (height, width),
        Resize::ShortestEdge(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            // Python: int(s * long / short), a float division truncated.
            let new_long = (f64::from(s) * f64::from(long) / f64::from(short)) as u32;
            if w <= h {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// transformers' `center_crop` to `(height, width)`: zero padding where the crop leaves the image.
fn center_crop(img: &RgbImage, (ch, cw): (u32, u32)) -> RgbImage {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let top = (h - i64::from(ch)).div_euclid(2);
    let left = (w - i64::from(cw)).div_euclid(2);
    if top >= 0 && left >= 0 {
        return image::imageops::crop_imm(img, left as u32, top as u32, cw, ch).to_image();
    }
    RgbImage::from_fn(cw, ch, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if (0..w).contains(&sx) && (0..h).contains(&sy) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// transformers' `convert_to_rgb`: an image with alpha is composited onto white (Pillow's
/// `alpha_composite`, 8-bit fixed point), others converted as `Image.convert("RGB")`.
pub fn to_rgb(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb([r, g, b].map(|c| composite_on_white(c, a)))
    })
}

/// One channel of `ImagingAlphaComposite` with a white, opaque destination.
fn composite_on_white(src: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let a = u32::from(alpha);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = u32::from(src) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> ImageProcessor {
        ImageProcessor::from_json(&v, Path::new("preprocessor_config.json")).unwrap()
    }

    #[test]
    fn shortest_edge_truncates_the_long_side() {
        let s = Resize::ShortestEdge(224);
        assert_eq!(resize_output_size(s, (480, 640)), (224, 298)); // 298.67
        assert_eq!(resize_output_size(s, (640, 480)), (298, 224));
        assert_eq!(resize_output_size(s, (100, 100)), (224, 224));
        assert_eq!(resize_output_size(s, (333, 1000)), (224, 672)); // 672.67
        let s = Resize::ShortestEdge(32);
        assert_eq!(resize_output_size(s, (160, 200)), (32, 40));
    }

    #[test]
    fn openai_clip_config_reads_int_sizes() {
        // openai/clip-vit-base-patch32's preprocessor_config.json
        let p = parse(json!({
            "crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224
        }));
        assert_eq!(p.kind, ProcessorKind::Clip);
        assert_eq!(p.size, Resize::ShortestEdge(224));
        assert_eq!(p.crop_size, (224, 224));
        assert_eq!(p.resample, Filter::Bicubic);
        assert_eq!(p.output_size((480, 640)), (224, 224));
        assert_eq!(p, parse(p.to_json()));
    }

    #[test]
    fn vit_int_size_is_a_square_without_crop() {
        let p = parse(json!({
            "feature_extractor_type": "ViTFeatureExtractor", "size": 224, "resample": 2,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]
        }));
        assert_eq!(
            p.size,
            Resize::Exact {
                height: 224,
                width: 224
            }
        );
        assert!(!p.do_center_crop);
        assert_eq!(p.output_size((480, 640)), (224, 224));
        let defaults = parse(json!({"image_processor_type": "ViTImageProcessor"}));
        assert_eq!(defaults.image_mean, STANDARD_MEAN);
        assert_eq!(defaults.resample, Filter::Bilinear);
    }

    #[test]
    fn unknown_processors_and_sizes_are_refused() {
        let p = Path::new("p.json");
        let bad = [
            json!({"image_processor_type": "SiglipImageProcessor"}),
            json!({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 3}}),
            json!({"image_processor_type": "CLIPImageProcessor", "resample": 9}),
            json!({"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5]}),
            json!({}),
        ];
        for v in bad {
            assert!(ImageProcessor::from_json(&v, p).is_err(), "{v}");
        }
    }

    #[test]
    fn crop_offsets_floor_and_pad_with_zeros() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 1]));
        // 5x4 -> 2x3 (w x h): left (5-2)//2 = 1, top (4-3)//2 = 0
        let c = center_crop(&img, (3, 2));
        assert_eq!(c.get_pixel(0, 0).0, [1, 0, 1]);
        // larger than the image: top (4-6)//2 = -1, left (5-6)//2 = -1 (floor)
        let c = center_crop(&img, (6, 6));
        assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(c.get_pixel(1, 1).0, [0, 0, 1]);
        assert_eq!(c.get_pixel(5, 4).0, [4, 3, 1]);
        assert_eq!(c.get_pixel(5, 5).0, [0, 0, 0]);
    }

    #[test]
    fn rescale_then_normalise_in_f32() {
        let p = parse(
            json!({"image_processor_type": "CLIPImageProcessor", "do_resize": false,
                             "do_center_crop": false}),
        );
        let img = RgbImage::from_pixel(1, 1, image::Rgb([0, 128, 255]));
        let t = p.preprocess(&img, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = |x: u8, c: usize| {
            ((f64::from(x) / 255.0) as f32 - CLIP_MEAN[c] as f32) / CLIP_STD[c] as f32
        };
        assert_eq!(v, vec![want(0, 0), want(128, 1), want(255, 2)]);
    }

    #[test]
    fn alpha_is_composited_onto_white() {
        // Pillow: Image.alpha_composite(white, (200, 100, 0, a)).convert("RGB")
        assert_eq!(composite_on_white(200, 255), 200);
        assert_eq!(composite_on_white(200, 0), 255);
        assert_eq!(composite_on_white(0, 128), 127);
        assert_eq!(composite_on_white(100, 64), 216);
        assert_eq!(composite_on_white(37, 1), 254);
        assert_eq!(composite_on_white(250, 254), 250);
    }
}
