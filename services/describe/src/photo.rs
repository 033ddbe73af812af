//! Preparing a photo for the model: decode (with limits, EXIF orientation applied), downsize so
//! the longest side is at most `max_px`, encode as JPEG, wrap in a base64 data URL.

use std::io::Cursor;

use base64::Engine as _;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use sha2::{Digest, Sha256};

/// Photos above this many pixels are refused before decoding (decompression bombs).
pub const MAX_PIXELS: u64 = 40_000_000;
/// JPEG quality of the copy sent to the model.
pub const JPEG_QUALITY: u8 = 90;

/// A photo ready to be sent: the data URL and the size of the encoded copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPhoto {
    pub data_url: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the photo cannot be read: {0}")]
pub struct PhotoError(pub String);

/// Lower-case hex SHA-256 of the photo's bytes, as used in [`crate::cache_key`].
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Decodes `bytes` (JPEG, PNG or WebP), applies the EXIF orientation, downsizes it so that its
/// longest side is at most `max_px` (never upsizes) and encodes it as a JPEG data URL.
pub fn prepare_photo(bytes: &[u8], max_px: u32) -> Result<PreparedPhoto, PhotoError> {
    let err = |e: &dyn std::fmt::Display| PhotoError(e.to_string());
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(&e))?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4 + (64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| err(&e))?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(PhotoError(format!(
            "{w}x{h} pixels is more than the {MAX_PIXELS} allowed"
        )));
    }
    let orientation = decoder.orientation().map_err(|e| err(&e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| err(&e))?;
    img.apply_orientation(orientation);

    let max_px = max_px.max(1);
    if img.width() > max_px || img.height() > max_px {
        img = img.resize(max_px, max_px, image::imageops::FilterType::CatmullRom);
    }
    let rgb = img.to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
        .encode_image(&rgb)
        .map_err(|e| err(&e))?;
    Ok(PreparedPhoto {
        data_url: format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&jpeg)
        ),
        width: rgb.width(),
        height: rgb.height(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        });
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn decode_data_url(url: &str) -> DynamicImage {
        let b64 = url.strip_prefix("data:image/jpeg;base64,").unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg).unwrap()
    }

    #[test]
    fn downsizes_longest_side_and_keeps_aspect() {
        let p = prepare_photo(&png(1000, 600), 512).unwrap();
        assert_eq!((p.width, p.height), (512, 307));
        let img = decode_data_url(&p.data_url);
        assert_eq!((img.width(), img.height()), (512, 307));
    }

    #[test]
    fn never_upsizes() {
        let p = prepare_photo(&png(200, 300), 512).unwrap();
        assert_eq!((p.width, p.height), (200, 300));
    }

    #[test]
    fn refuses_garbage_and_truncated_files() {
        assert!(prepare_photo(b"not an image at all", 512).is_err());
        let full = png(300, 300);
        assert!(prepare_photo(&full[..full.len() / 2], 512).is_err());
    }

    #[test]
    fn sha256_is_lower_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
