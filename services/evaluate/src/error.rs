//! The evaluator's one error type.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A model directory lacks a file, or a file cannot be read.
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// A config.json / preprocessor_config.json that does not describe a model we can run.
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// A weights file without a tensor the model needs. Never filled with random weights.
    #[error("{path}: the weights have no tensor {name:?}")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor of the wrong shape, or any other tensor error.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("image error: {0}")]
    Image(String),
    /// A mask that is not a usable subject mask (not a PNG, empty, ...).
    #[error(transparent)]
    Mask(#[from] sidbooth_imaging::MaskError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;

impl EvalError {
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        EvalError::Io {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    }

    pub fn config(path: &Path, reason: impl Into<String>) -> Self {
        EvalError::Config {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    /// Wraps a tensor error raised while building a model from `path`: a tensor missing from the
    /// file (the engine's weight sources raise `CannotFindTensor` for it, whatever the file)
    /// becomes [`EvalError::MissingTensor`] naming it.
    pub fn loading(path: &Path, e: candle_core::Error) -> Self {
        let mut inner = &e;
        loop {
            match inner {
                candle_core::Error::CannotFindTensor { path: name } => {
                    return EvalError::MissingTensor {
                        path: path.to_owned(),
                        name: name.clone(),
                    }
                }
                candle_core::Error::WithBacktrace { inner: i, .. }
                | candle_core::Error::Context { inner: i, .. }
                | candle_core::Error::WithPath { inner: i, .. } => inner = i,
                _ => break,
            }
        }
        EvalError::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    }
}

impl From<image::ImageError> for EvalError {
    fn from(e: image::ImageError) -> Self {
        EvalError::Image(e.to_string())
    }
}

impl From<sidbooth_engine::Error> for EvalError {
    fn from(e: sidbooth_engine::Error) -> Self {
        match e {
            sidbooth_engine::Error::Candle(e) => EvalError::Candle(e),
            sidbooth_engine::Error::Tokenizer(e) => EvalError::Tokenizer(e),
            sidbooth_engine::Error::Image(e) => EvalError::Image(e),
            other => EvalError::Invalid(other.to_string()),
        }
    }
}
