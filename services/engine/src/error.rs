//! Error type of the engine.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("configuration error: {0}")]
    Config(String),
    #[error("io error: {0}")]
    Io(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("image error: {0}")]
    Image(String),
    #[error("lora error: {0}")]
    Lora(String),
    #[error("canceled")]
    Canceled,
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

impl From<image::ImageError> for Error {
    fn from(e: image::ImageError) -> Self {
        Error::Image(e.to_string())
    }
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error::Io(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
