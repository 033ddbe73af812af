//! Domain types shared by every sidbooth crate: the job spec a user posts, the statuses and
//! stages a job moves through, and newtypes that parse user input once.
//!
//! This crate does no I/O. Anything that reaches a database, storage, a model or the network
//! lives elsewhere and takes these types as already-validated input.

pub mod prompts;
pub mod report;
pub mod spec;
pub mod spec_error;
pub mod status;
pub mod text;
pub mod train;

pub use prompts::{dreambooth_prompts, SubjectKind};
pub use spec::{
    DescriptionCase, DescriptionSource, DescriptionsSpec, GenerateSettings, JobSpec, Mode,
    SpecError, Stage, MAX_IMAGES,
};
pub use status::{JobStatus, ParseStatusError};
pub use text::{IdentifierToken, SubjectClass, TextError};
pub use train::{TrainMethod, TrainSettings};
