//! PNG files that carry how they were made (prompt, seed, settings) in text chunks, the way
//! image viewers and other diffusion tools read them.

use image::RgbImage;

use crate::{Error, Result};

/// An 8-bit RGB PNG of `image` with `text` as tEXt chunks (iTXt for text that is not Latin-1).
pub fn encode<K: AsRef<str>>(image: &RgbImage, text: &[(K, String)]) -> Result<Vec<u8>> {
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
                    .add_text_chunk(key.as_ref().to_owned(), value.clone())
                    .map_err(err)?;
            } else {
                encoder
                    .add_itxt_chunk(key.as_ref().to_owned(), value.clone())
                    .map_err(err)?;
            }
        }
        let mut writer = encoder.write_header().map_err(err)?;
        writer.write_image_data(image.as_raw()).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

/// How one generated image was made. The CLI and the worker both write exactly these text
/// chunks, so `sidbooth generate` given them (prompt, seed, steps, guidance, size, base model,
/// weights) makes the same image again, whichever of the two made it.
#[derive(Debug, Clone)]
pub struct ImageSettings<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    /// The image's own seed ([`crate::pipeline::image_seed`]): a one-image request with it
    /// reproduces the image.
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: u32,
    pub height: u32,
    /// The base model's name as the worker and CLI report it.
    pub base_model: &'a str,
    /// The training method of the weights applied, if any.
    pub method: Option<&'a str>,
    /// The weights applied (a path or an artifact name), if any, and their scale.
    pub weights: Option<&'a str>,
    pub weight_scale: Option<f64>,
}

impl ImageSettings<'_> {
    /// The text chunks, in a fixed order; absent values are empty strings.
    pub fn text(&self) -> Vec<(&'static str, String)> {
        vec![
            ("prompt", self.prompt.to_owned()),
            (
                "negative_prompt",
                self.negative_prompt.unwrap_or_default().to_owned(),
            ),
            ("seed", self.seed.to_string()),
            ("steps", self.steps.to_string()),
            ("guidance_scale", self.guidance_scale.to_string()),
            ("width", self.width.to_string()),
            ("height", self.height.to_string()),
            ("sampler", "DDIM".to_owned()),
            ("base_model", self.base_model.to_owned()),
            ("method", self.method.unwrap_or_default().to_owned()),
            ("weights", self.weights.unwrap_or_default().to_owned()),
            (
                "weight_scale",
                self.weight_scale.map(|w| w.to_string()).unwrap_or_default(),
            ),
            (
                "Software",
                format!("sidbooth {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
    }
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
