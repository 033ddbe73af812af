//! PNG files that carry how they were made (prompt, seed, settings) in text chunks, the way
//! image viewers and other diffusion tools read them.

use image::RgbImage;

use crate::{Error, Result};

/// An 8-bit RGB PNG of `image` with `text` as tEXt chunks (iTXt for text that is not Latin-1).
pub fn encode(image: &RgbImage, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::Image(e.to_string());
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(
            std::io::Cursor::new(&mut out),
            image.width(),
            image.height(),
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            if value.chars().all(|c| (c as u32) < 256) {
                encoder
                    .add_text_chunk((*key).to_owned(), value.clone())
                    .map_err(err)?;
            } else {
                encoder
                    .add_itxt_chunk((*key).to_owned(), value.clone())
                    .map_err(err)?;
            }
        }
        let mut writer = encoder.write_header().map_err(err)?;
        writer.write_image_data(image.as_raw()).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip() {
        let image = RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let bytes = encode(
            &image,
            &[("prompt", "a sks dog".into()), ("note", "café ☕".into())],
        )
        .unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(bytes.clone()))
            .read_info()
            .unwrap();
        let info = reader.info();
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "prompt");
        assert_eq!(info.uncompressed_latin1_text[0].text, "a sks dog");
        assert_eq!(info.utf8_text[0].get_text().unwrap(), "café ☕");
        assert_eq!(image::load_from_memory(&bytes).unwrap().to_rgb8(), image);
    }
}
