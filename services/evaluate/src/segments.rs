//! The two views of a reference photo that the paper's mask-based measures compare generated
//! images with. Our definition (the paper gives no code; keep it, report.json names it):
//!
//! * **subject segment**: the pixels outside the mask set to black, cropped to the mask's
//!   bounding box, padded with black to a square with the box centred (offsets
//!   `(side - w) / 2`, `(side - h) / 2`, rounded down);
//! * **non-subject segment**: the photo with the mask's pixels set to black, uncropped.
//!
//! Both then go through the CLIP preprocessing like any image. A mask of another size than the
//! photo is first resized to it (nearest).

use image::{Rgb, RgbImage};

use crate::mask::Mask;

const BLACK: Rgb<u8> = Rgb([0, 0, 0]);

fn fitted(photo: &RgbImage, mask: &Mask) -> Mask {
    let (w, h) = photo.dimensions();
    mask.resized(w, h)
}

/// The subject alone, centred on a black square; `None` when the mask has no subject pixel.
pub fn subject_segment(photo: &RgbImage, mask: &Mask) -> Option<RgbImage> {
    let mask = fitted(photo, mask);
    let b = mask.bbox()?;
    let (x0, y0) = (b.x0 as u32, b.y0 as u32);
    let (w, h) = (b.x1 as u32 - x0 + 1, b.y1 as u32 - y0 + 1);
    let side = w.max(h);
    let (ox, oy) = ((side - w) / 2, (side - h) / 2);
    let mut out = RgbImage::from_pixel(side, side, BLACK);
    for y in 0..h {
        for x in 0..w {
            if mask.get(x0 + x, y0 + y) {
                out.put_pixel(ox + x, oy + y, *photo.get_pixel(x0 + x, y0 + y));
            }
        }
    }
    Some(out)
}

/// Everything but the subject: the photo with the subject blacked out.
pub fn non_subject_segment(photo: &RgbImage, mask: &Mask) -> RgbImage {
    let mask = fitted(photo, mask);
    let mut out = photo.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        if mask.get(x, y) {
            *p = BLACK;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> RgbImage {
        RgbImage::from_fn(6, 4, |x, y| Rgb([10 + x as u8, 100 + y as u8, 200]))
    }

    /// Subject: an L shape inside columns 1..=3, rows 1..=2.
    fn mask() -> Mask {
        Mask::from_bools(6, 4, |x, y| {
            (y == 1 && (1..=3).contains(&x)) || (y == 2 && x == 1)
        })
    }

    #[test]
    fn subject_segment_pixel_for_pixel() {
        let seg = subject_segment(&photo(), &mask()).unwrap();
        // Box 3 wide, 2 high -> a 3x3 square, the box at row offset (3 - 2) / 2 = 0.
        assert_eq!(seg.dimensions(), (3, 3));
        let p = |x: u8, y: u8| Rgb([10 + x, 100 + y, 200]);
        let expected = [
            [p(1, 1), p(2, 1), p(3, 1)],
            [p(1, 2), BLACK, BLACK],
            [BLACK, BLACK, BLACK],
        ];
        for (y, row) in expected.iter().enumerate() {
            for (x, want) in row.iter().enumerate() {
                assert_eq!(seg.get_pixel(x as u32, y as u32), want, "({x}, {y})");
            }
        }
    }

    #[test]
    fn tall_boxes_are_centred_horizontally() {
        let m = Mask::from_bools(6, 4, |x, _| x == 4);
        let seg = subject_segment(&photo(), &m).unwrap();
        assert_eq!(seg.dimensions(), (4, 4));
        for y in 0..4 {
            assert_eq!(seg.get_pixel(1, y), &Rgb([14, 100 + y as u8, 200]));
            for x in [0, 2, 3] {
                assert_eq!(seg.get_pixel(x, y), &BLACK);
            }
        }
    }

    #[test]
    fn non_subject_segment_pixel_for_pixel() {
        let seg = non_subject_segment(&photo(), &mask());
        let m = mask();
        for (x, y, p) in seg.enumerate_pixels() {
            let want = if m.get(x, y) {
                BLACK
            } else {
                *photo().get_pixel(x, y)
            };
            assert_eq!(*p, want, "({x}, {y})");
        }
    }

    #[test]
    fn masks_of_another_size_are_fitted_first() {
        // The same L shape drawn at twice the resolution covers the same pixels.
        let small = mask();
        let big = small.resized(12, 8);
        assert_eq!(
            non_subject_segment(&photo(), &big),
            non_subject_segment(&photo(), &small)
        );
        assert_eq!(
            subject_segment(&photo(), &big),
            subject_segment(&photo(), &small)
        );
        assert!(subject_segment(&photo(), &Mask::from_bools(6, 4, |_, _| false)).is_none());
    }
}
