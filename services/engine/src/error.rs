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

/// Whether a failure with this message may go away when the same work is tried again, later or
/// on another machine: the machine ran out of something (GPU or host memory, disk space, a
/// quota, file handles) or lost its GPU. Anything else (a bad input, a shape that does not fit,
/// a model file that does not parse) fails the same way every time and is permanent.
///
/// Errors reach the worker as text (candle's and CUDA's errors carry no kind), so the test is
/// on the words the operating system, CUDA and cuBLAS/cuDNN use for these conditions.
pub fn is_transient_failure(message: &str) -> bool {
    const SIGNS: &[&str] = &[
        // CUDA driver and runtime, cuBLAS, cuDNN, candle's allocator.
        "out of memory",
        "OUT_OF_MEMORY",
        "OutOfMemory",
        "ALLOC_FAILED",
        "CUDA_ERROR_LAUNCH_FAILED",
        "CUDA_ERROR_ECC_UNCORRECTABLE",
        "CUDA_ERROR_NOT_READY",
        "CUDA_ERROR_DEVICE_UNAVAILABLE",
        // std::io::Error's text: ENOSPC, EDQUOT, ENOMEM, EMFILE, ENFILE.
        "(os error 28)",
        "(os error 122)",
        "(os error 12)",
        "(os error 24)",
        "(os error 23)",
        "No space left on device",
        "Disk quota exceeded",
        "Cannot allocate memory",
        "Too many open files",
    ];
    SIGNS.iter().any(|s| message.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_something_is_transient_and_the_rest_is_not() {
        let disk = std::io::Error::from_raw_os_error(28);
        for transient in [
            Error::from(disk).to_string(),
            Error::from(std::io::Error::from_raw_os_error(12)).to_string(),
            "tensor error: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".to_owned(),
            "tensor error: cublas error CUBLAS_STATUS_ALLOC_FAILED".to_owned(),
        ] {
            assert!(is_transient_failure(&transient), "{transient}");
        }
        for permanent in [
            "tensor error: shape mismatch in matmul, lhs: [2, 3], rhs: [4, 5]".to_owned(),
            Error::from(std::io::Error::from_raw_os_error(2)).to_string(),
            // EACCES is 13: not mistaken for ENOMEM's 12.
            Error::from(std::io::Error::from_raw_os_error(13)).to_string(),
            Error::Config("unknown method".into()).to_string(),
        ] {
            assert!(!is_transient_failure(&permanent), "{permanent}");
        }
    }
}
