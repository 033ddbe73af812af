//! Subject masks: one bit per pixel of a photo, white (subject) or black (everything else).
//!
//! Masks come from a user's upload or from SAM; either way they are stored and exchanged as
//! PNGs (`masks/NN.png`), 255 = subject. Reading one is strict: a mask that is not a PNG, has no
//! subject pixel or does not fit its photo is refused with a stable code, never guessed.

use std::io::Cursor;

use image::{GrayImage, ImageFormat, Luma};

use crate::resample::{resize_gray, Filter};

/// Why a mask PNG was refused. `code` is stable (API problem details, job errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MaskError {
    pub code: &'static str,
    pub message: String,
}

/// A box in pixel coordinates of an image, `x0 <= x1`, `y0 <= y1` (SAM's XYXY convention: a
/// box computed from a mask has its last subject column and row as `x1`, `y1`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PixelBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

impl PixelBox {
    pub fn width(&self) -> f32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> f32 {
        self.y1 - self.y0
    }

    pub fn area(&self) -> f32 {
        self.width().max(0.0) * self.height().max(0.0)
    }

    /// Intersection over union with another box.
    pub fn iou(&self, other: &PixelBox) -> f32 {
        let w = (self.x1.min(other.x1) - self.x0.max(other.x0)).max(0.0);
        let h = (self.y1.min(other.y1) - self.y0.max(other.y0)).max(0.0);
        let inter = w * h;
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }
}

/// Value of a subject pixel in a mask PNG.
pub const SUBJECT: u8 = 255;

/// A binary subject mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask(GrayImage);

impl Mask {
    /// A mask whose pixel `(x, y)` is subject where `subject(x, y)` holds.
    pub fn from_bools(width: u32, height: u32, subject: impl Fn(u32, u32) -> bool) -> Mask {
        Mask(GrayImage::from_fn(width, height, |x, y| {
            Luma([if subject(x, y) { SUBJECT } else { 0 }])
        }))
    }

    /// Binarises a grey image: a pixel is subject when its value is over 127.
    pub fn from_gray(gray: &GrayImage) -> Mask {
        let (w, h) = gray.dimensions();
        Mask::from_bools(w, h, |x, y| gray.get_pixel(x, y).0[0] > 127)
    }

    /// Reads a mask PNG (any PNG colour type; its luminance decides, alpha is ignored).
    /// Refuses anything that is not a PNG (`mask_not_png`), cannot be decoded
    /// (`mask_unreadable`) or has no subject pixel (`mask_empty`).
    pub fn from_png(bytes: &[u8]) -> Result<Mask, MaskError> {
        if image::guess_format(bytes).ok() != Some(ImageFormat::Png) {
            return Err(MaskError {
                code: "mask_not_png",
                message: "a mask must be a PNG image (white = subject, black = the rest)".into(),
            });
        }
        let decoded =
            image::load_from_memory_with_format(bytes, ImageFormat::Png).map_err(|e| {
                MaskError {
                    code: "mask_unreadable",
                    message: format!("the mask PNG cannot be decoded: {e}"),
                }
            })?;
        let mask = Mask::from_gray(&decoded.to_luma8());
        if mask.area() == 0 {
            return Err(MaskError {
                code: "mask_empty",
                message: "the mask has no white (subject) pixel".into(),
            });
        }
        Ok(mask)
    }

    /// The mask as an 8-bit greyscale PNG, 255 = subject.
    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.0
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encoding a greyscale PNG into memory cannot fail");
        out
    }

    pub fn width(&self) -> u32 {
        self.0.width()
    }

    pub fn height(&self) -> u32 {
        self.0.height()
    }

    pub fn dimensions(&self) -> (u32, u32) {
        self.0.dimensions()
    }

    pub fn get(&self, x: u32, y: u32) -> bool {
        self.0.get_pixel(x, y).0[0] == SUBJECT
    }

    pub fn as_gray(&self) -> &GrayImage {
        &self.0
    }

    /// Number of subject pixels.
    pub fn area(&self) -> u64 {
        self.0.as_raw().iter().filter(|&&v| v == SUBJECT).count() as u64
    }

    /// Share of the image that is subject, in [0, 1].
    pub fn coverage(&self) -> f64 {
        let (w, h) = self.dimensions();
        self.area() as f64 / (u64::from(w) * u64::from(h)).max(1) as f64
    }

    /// The smallest box holding every subject pixel (inclusive: `x1`, `y1` are the last subject
    /// column and row); `None` for an empty mask.
    pub fn bbox(&self) -> Option<PixelBox> {
        let (w, h) = self.dimensions();
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        let mut any = false;
        for (x, y, p) in self.0.enumerate_pixels() {
            if p.0[0] == SUBJECT {
                any = true;
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
        any.then_some(PixelBox {
            x0: x0 as f32,
            y0: y0 as f32,
            x1: x1 as f32,
            y1: y1 as f32,
        })
    }

    /// The mask at another size, nearest neighbour as Pillow does it (so a mask drawn at
    /// another resolution covers the same part of the photo).
    pub fn resized(&self, width: u32, height: u32) -> Mask {
        if self.dimensions() == (width, height) {
            return self.clone();
        }
        Mask(resize_gray(&self.0, width, height, Filter::Nearest))
    }

    /// Intersection over union with another mask of the same size.
    pub fn iou(&self, other: &Mask) -> f64 {
        assert_eq!(
            self.dimensions(),
            other.dimensions(),
            "masks of different sizes"
        );
        let (mut inter, mut union) = (0u64, 0u64);
        for (a, b) in self.0.as_raw().iter().zip(other.0.as_raw()) {
            let (a, b) = (*a == SUBJECT, *b == SUBJECT);
            inter += u64::from(a && b);
            union += u64::from(a || b);
        }
        if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(w: u32, h: u32, x0: u32, y0: u32, x1: u32, y1: u32) -> Mask {
        Mask::from_bools(w, h, |x, y| {
            (x0..=x1).contains(&x) && (y0..=y1).contains(&y)
        })
    }

    #[test]
    fn png_round_trip_and_bounds() {
        let m = square(10, 8, 2, 3, 5, 6);
        let back = Mask::from_png(&m.to_png()).unwrap();
        assert_eq!(back, m);
        assert_eq!(m.area(), 4 * 4);
        assert_eq!(
            m.bbox(),
            Some(PixelBox {
                x0: 2.0,
                y0: 3.0,
                x1: 5.0,
                y1: 6.0
            })
        );
    }

    #[test]
    fn bad_masks_are_refused_with_their_codes() {
        let code = |bytes: &[u8]| match Mask::from_png(bytes) {
            Err(MaskError { code, .. }) => code,
            other => panic!("expected a mask error, got {other:?}"),
        };
        assert_eq!(code(b"GIF89a not a png"), "mask_not_png");
        let empty = Mask::from_bools(4, 4, |_, _| false).to_png();
        assert_eq!(code(&empty), "mask_empty");
        let mut cut = square(4, 4, 0, 0, 1, 1).to_png();
        cut.truncate(cut.len() / 2);
        assert_eq!(code(&cut), "mask_unreadable");
    }

    #[test]
    fn colour_pngs_binarise_on_luminance() {
        let rgb = image::RgbImage::from_fn(3, 1, |x, _| match x {
            0 => image::Rgb([255, 255, 255]),
            1 => image::Rgb([100, 100, 100]),
            _ => image::Rgb([250, 240, 245]),
        });
        let mut bytes = Vec::new();
        rgb.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        let m = Mask::from_png(&bytes).unwrap();
        assert_eq!((m.get(0, 0), m.get(1, 0), m.get(2, 0)), (true, false, true));
    }

    #[test]
    fn resizing_is_nearest() {
        let m = square(4, 4, 0, 0, 1, 1);
        let big = m.resized(8, 8);
        assert_eq!(big, square(8, 8, 0, 0, 3, 3));
        assert_eq!(big.resized(4, 4), m);
    }

    #[test]
    fn box_and_mask_iou() {
        let a = PixelBox {
            x0: 0.0,
            y0: 0.0,
            x1: 2.0,
            y1: 2.0,
        };
        let b = PixelBox {
            x0: 1.0,
            y0: 1.0,
            x1: 3.0,
            y1: 3.0,
        };
        assert!((a.iou(&b) - 1.0 / 7.0).abs() < 1e-6);
        let m = square(4, 4, 0, 0, 1, 1);
        let n = square(4, 4, 1, 0, 2, 1);
        assert!((m.iou(&n) - 2.0 / 6.0).abs() < 1e-9);
    }
}
