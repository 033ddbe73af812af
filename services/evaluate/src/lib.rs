//! sidbooth's evaluator: does a personalised model keep the subject and leave the background
//! out?
//!
//! * [`clip`] and [`dino`]: CLIP (image and text towers with projections) and DINO ViT image
//!   embeddings on candle, loaded from local transformers-layout directories, preprocessing
//!   exactly as transformers' (PIL) image processors do ([`resample`], [`preprocess`]); their
//!   shared ViT trunk is [`vision`], with in-place CPU kernels in [`fused`].
//! * [`sam`]: Segment Anything (box prompts and automatic mask proposals) for subject masks,
//!   and [`subject`]: the class-conditioned subject mask (a box, then SAM).
//! * [`mask`] and [`segments`]: subject masks and the subject / non-subject segments the
//!   measures look at.
//! * [`evaluator`]: the models together and the features they extract; [`measures`]: the
//!   paper's subject-alignment, non-subject-disentanglement and text-alignment, DreamBooth's
//!   CLIP-I and DINO, and the share of the identifier's attention that falls on the subject.
//! * [`report`]: report.json assembled from the features; [`report_html`]: the self-contained
//!   page a person opens in a browser.
//!
//! Everything is synchronous and CPU/GPU bound; callers run it on a blocking thread.

pub mod clip;
pub mod dino;
pub mod error;
pub mod evaluator;
pub mod fused;
pub mod measures;
pub mod preprocess;
pub mod report;
pub mod report_html;
pub mod sam;
pub mod segments;
pub mod subject;
pub mod vision;

/// Subject masks and Pillow-exact resizing live in `sidbooth-imaging`, shared with the API.
pub use sidbooth_imaging::{mask, resample};

pub use error::{EvalError, Result};
