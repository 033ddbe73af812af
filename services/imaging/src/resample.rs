//! Image resizing exactly as Pillow's `Image.resize` does it for 8-bit images.
//!
//! transformers' slow image processors (CLIPImageProcessor, ViTImageProcessor) and
//! segment-anything's `ResizeLongestSide` resize through Pillow. Another implementation of the
//! same filter (the `image` crate's CatmullRom, say) differs by one or two grey levels here and
//! there, which moves the embeddings by more than the parity tolerance. So this is Pillow's
//! algorithm, step for step:
//!
//! * convolution filters (box, bilinear, hamming, bicubic with a = -0.5, lanczos-3) whose support
//!   grows with the downscaling factor (antialiasing), coefficients normalised per output pixel
//!   and converted to 22-bit fixed point, a horizontal pass into an 8-bit buffer holding only
//!   the rows the vertical pass reads, then the vertical pass, each rounding and clipping to
//!   0..=255 (`Resample.c`);
//! * nearest neighbour as Pillow's affine scale: source position accumulated in `f64` from
//!   `scale / 2` in steps of `scale`, truncated (`Geometry.c`, `ImagingScaleAffine`).

use image::{GrayImage, RgbImage};

/// Pillow's resampling filters, with their Pillow codes (`Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl Filter {
    /// The filter a transformers config names by its Pillow code (`"resample": 3`).
    pub fn from_pil(code: i64) -> Option<Filter> {
        Some(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    /// Half-width of the kernel at scale 1, and the kernel itself.
    fn kernel(self) -> (f64, fn(f64) -> f64) {
        match self {
            Filter::Nearest => unreachable!("nearest is not a convolution"),
            Filter::Box => (0.5, box_kernel),
            Filter::Bilinear => (1.0, bilinear_kernel),
            Filter::Hamming => (1.0, hamming_kernel),
            Filter::Bicubic => (2.0, bicubic_kernel),
            Filter::Lanczos => (3.0, lanczos_kernel),
        }
    }
}

fn box_kernel(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_kernel(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        1.0
    } else if x >= 1.0 {
        0.0
    } else {
        let x = x * std::f64::consts::PI;
        // Pillow writes the window's constants as C floats.
        x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
    }
}

fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_kernel(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output pixel: the first input pixel it reads, how many, and their fixed-point
/// weights (`ksize` slots per output pixel).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let (support, kernel) = filter.kernel();
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; negative starts are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(xmax) {
            let w = kernel((x as f64 + xmin as f64 - center + 0.5) * ss);
            *slot = w;
            total += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel) to `out_w` x `out_h`.
pub fn resize_pixels(
    src: &[u8],
    (w, h): (u32, u32),
    channels: usize,
    (out_w, out_h): (u32, u32),
    filter: Filter,
) -> Vec<u8> {
    let (w, h, ow, oh) = (w as usize, h as usize, out_w as usize, out_h as usize);
    assert_eq!(
        src.len(),
        w * h * channels,
        "pixel buffer of the wrong size"
    );
    assert!(ow > 0 && oh > 0, "resizing to an empty image");
    if (w, h) == (ow, oh) {
        return src.to_vec();
    }
    if filter == Filter::Nearest {
        return nearest(src, (w, h), channels, (ow, oh));
    }

    let vert = coefficients(h, oh, filter);
    // Rows of the input the vertical pass reads; the horizontal pass computes only these.
    let first_row = vert.bounds[0].0;
    let last_row = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;

    let (horizontal, hw, row_offset) = if ow != w {
        let horiz = coefficients(w, ow, filter);
        let rows = last_row - first_row;
        let mut out = vec![0u8; ow * rows * channels];
        for y in 0..rows {
            let line = &src[(y + first_row) * w * channels..(y + first_row + 1) * w * channels];
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + xmax];
                for c in 0..channels {
                    let mut ss = 1i32 << (PRECISION_BITS - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        ss += i32::from(line[(x + xmin) * channels + c]) * kx;
                    }
                    out[(y * ow + xx) * channels + c] = clip8(ss);
                }
            }
        }
        (out, ow, first_row)
    } else {
        (src.to_vec(), w, 0)
    };

    if oh == h {
        return horizontal;
    }
    let mut out = vec![0u8; hw * oh * channels];
    for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + ymax];
        let ymin = ymin - row_offset;
        for xx in 0..hw {
            for c in 0..channels {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for (y, &ky) in k.iter().enumerate() {
                    ss += i32::from(horizontal[((y + ymin) * hw + xx) * channels + c]) * ky;
                }
                out[(yy * hw + xx) * channels + c] = clip8(ss);
            }
        }
    }
    out
}

/// Pillow's nearest-neighbour scale: positions accumulated in f64, truncated.
fn nearest(
    src: &[u8],
    (w, h): (usize, usize),
    channels: usize,
    (ow, oh): (usize, usize),
) -> Vec<u8> {
    let positions = |in_size: usize, out_size: usize| -> Vec<Option<usize>> {
        let step = in_size as f64 / out_size as f64;
        let mut at = step * 0.5;
        (0..out_size)
            .map(|_| {
                let i = if at < 0.0 { None } else { Some(at as usize) };
                at += step;
                i.filter(|&i| i < in_size)
            })
            .collect()
    };
    let xs = positions(w, ow);
    let ys = positions(h, oh);
    let mut out = vec![0u8; ow * oh * channels];
    for (y, sy) in ys.iter().enumerate() {
        let Some(sy) = sy else { continue };
        for (x, sx) in xs.iter().enumerate() {
            let Some(sx) = sx else { continue };
            let from = (sy * w + sx) * channels;
            let to = (y * ow + x) * channels;
            out[to..to + channels].copy_from_slice(&src[from..from + channels]);
        }
    }
    out
}

/// `Image.resize((w, h), filter)` of an RGB image.
pub fn resize_rgb(image: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let pixels = resize_pixels(image.as_raw(), image.dimensions(), 3, (w, h), filter);
    RgbImage::from_raw(w, h, pixels).expect("the buffer has w * h * 3 bytes")
}

/// `Image.resize((w, h), filter)` of a single-channel ("L") image.
pub fn resize_gray(image: &GrayImage, w: u32, h: u32, filter: Filter) -> GrayImage {
    let pixels = resize_pixels(image.as_raw(), image.dimensions(), 1, (w, h), filter);
    GrayImage::from_raw(w, h, pixels).expect("the buffer has w * h bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn pillow_codes() {
        assert_eq!(Filter::from_pil(3), Some(Filter::Bicubic));
        assert_eq!(Filter::from_pil(2), Some(Filter::Bilinear));
        assert_eq!(Filter::from_pil(0), Some(Filter::Nearest));
        assert_eq!(Filter::from_pil(9), None);
    }

    #[test]
    fn constant_images_stay_constant() {
        // Weights are normalised per output pixel, so a flat image stays flat under every
        // filter and scale, up- or down-sampling.
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 77]));
        for filter in [
            Filter::Box,
            Filter::Bilinear,
            Filter::Hamming,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Nearest,
        ] {
            for (w, h) in [(10, 7), (64, 50), (37, 5), (3, 23)] {
                let out = resize_rgb(&flat, w, h, filter);
                assert!(
                    out.pixels().all(|p| p.0 == [200, 13, 77]),
                    "{filter:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn box_downscale_by_two_averages_pairs() {
        // Box filter at an integer factor is a plain mean with round-half-up.
        let img = GrayImage::from_raw(4, 1, vec![0, 1, 100, 200]).unwrap();
        let out = resize_gray(&img, 2, 1, Filter::Box);
        assert_eq!(out.as_raw(), &vec![1, 150]);
    }

    #[test]
    fn bilinear_upscale_matches_hand_computed_weights() {
        // 2 -> 4 pixels: centres at 0.25, 0.75, 1.25, 1.75 of the input; weights 1/0, 0.75/0.25,
        // 0.25/0.75, 0/1 after normalisation over the clipped support.
        let img = GrayImage::from_raw(2, 1, vec![0, 100]).unwrap();
        let out = resize_gray(&img, 4, 1, Filter::Bilinear);
        assert_eq!(out.as_raw(), &vec![0, 25, 75, 100]);
    }

    #[test]
    fn nearest_picks_the_pixel_under_each_centre() {
        let img = GrayImage::from_raw(3, 1, vec![10, 20, 30]).unwrap();
        assert_eq!(
            resize_gray(&img, 6, 1, Filter::Nearest).as_raw(),
            &vec![10, 10, 20, 20, 30, 30]
        );
        assert_eq!(
            resize_gray(&img, 2, 1, Filter::Nearest).as_raw(),
            &vec![10, 30]
        );
    }

    #[test]
    fn one_axis_only_touches_that_axis() {
        let img = gradient(20, 9);
        let out = resize_rgb(&img, 20, 4, Filter::Bicubic);
        assert_eq!(out.dimensions(), (20, 4));
        let out = resize_rgb(&img, 7, 9, Filter::Bicubic);
        assert_eq!(out.dimensions(), (7, 9));
        assert_eq!(resize_rgb(&img, 20, 9, Filter::Bicubic), img);
    }
}
