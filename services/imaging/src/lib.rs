//! 8-bit image operations shared by the API and the evaluator.
//!
//! * [`resample`]: `Image.resize` exactly as Pillow computes it (the reference preprocessing of
//!   transformers' image processors and of segment-anything goes through Pillow);
//! * [`mask`]: subject masks, their PNG form and the checks an uploaded mask must pass.

pub mod mask;
pub mod resample;

pub use mask::{Mask, MaskError, PixelBox};
pub use resample::{resize_gray, resize_rgb, Filter};
