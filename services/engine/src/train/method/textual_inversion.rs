//! Textual Inversion: a new token `<sks>` whose embedding alone learns.
//!
//! As diffusers' `textual_inversion.py`: the token is added to the tokenizer as a whole word,
//! with `num_vectors` embedding rows (`<sks>`, `<sks>_1`, ..., and a prompt's `<sks>` stands for
//! all of them), initialised from the class word; the output `learned_embeds.safetensors` is
//! `{"<sks>": [n, hidden]}`, which `pipe.load_textual_inversion(dir)` loads. On request the same
//! rows are also written in the layout A1111 and ComfyUI read, `<sks>.safetensors` holding
//! `emb_params` (A1111 names the embedding after the file, so the prompt word stays `<sks>`).
//!
//! Where we differ from the reference:
//! - The trainable parameter is the new rows only, not the whole embedding matrix with the
//!   other rows restored after each step: the same update of the new rows, without Adam moments
//!   for the whole vocabulary. Gradient clipping (the trainer's, 1.0 by default; the script does
//!   not clip) therefore sees the new rows' gradient only.
//! - An initializer word of several tokens starts from their mean embedding; the script
//!   refuses such a word. One token gives the script's initialisation exactly.
//! - Training prompts are the job's descriptions with `<sks>` (not the script's
//!   "a photo of a {}" templates), and the defaults are those of the job spec (3000 steps at
//!   2e-3 for our batch of 1: the script's 5e-4 scaled by its batch of 4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::MethodEntry;
use super::{
    export_metadata, ExportContext, ExportInfo, ExportedWeights, ModelsMut, TrainingMethod,
};
use crate::pipeline::StableDiffusion;
use crate::train::host::PromptEncoder;
use crate::train::TrainError;

/// The file diffusers' `load_textual_inversion` reads: `{"<token>": [n, hidden]}`.
pub const EMBEDS_FILE: &str = "learned_embeds.safetensors";
/// The tensor name A1111 and ComfyUI read in an embedding file.
pub const A1111_KEY: &str = "emb_params";

/// The A1111 embedding file of `token` (its name is the word prompts use).
pub fn a1111_file(token: &str) -> String {
    format!("{token}.safetensors")
}

pub const ENTRY: MethodEntry = MethodEntry {
    kind: "textual_inversion",
    marker: EMBEDS_FILE,
    load: load_output,
};

/// Adds the learned token of `dir` to the pipeline; `scale` does not apply to an embedding.
fn load_output(sd: &mut StableDiffusion, dir: &Path, _scale: f64) -> crate::Result<()> {
    load_embedding(sd, &dir.join(EMBEDS_FILE)).map(|_| ())
}

/// Adds the token of an embedding file in diffusers' layout (one tensor named by its token,
/// `[n, hidden]` or `[hidden]`, as `textual_inversion.py` and `train_custom_diffusion.py` write
/// it) to the pipeline's tokenizer and text encoder. Returns the token.
pub fn load_embedding(sd: &mut StableDiffusion, path: &Path) -> crate::Result<String> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut it = tensors.into_iter();
    let (Some((token, rows)), None) = (it.next(), it.next()) else {
        return Err(crate::Error::Invalid(format!(
            "{}: an embedding file holds exactly one tensor, named by its token",
            path.display()
        )));
    };
    let rows = match rows.rank() {
        1 => rows.unsqueeze(0)?,
        2 => rows,
        r => {
            return Err(crate::Error::Invalid(format!(
                "{}: embedding {token} has rank {r}",
                path.display()
            )))
        }
    };
    sd.add_token_embeddings(&token, &rows)?;
    Ok(token)
}

/// A new token whose embedding rows are a variable while every other row stays the base
/// model's. Shared by Textual Inversion and Custom Diffusion.
pub(crate) struct NewToken {
    token: String,
    ids: Vec<u32>,
    /// The base model's rows (before the new ones).
    base: Tensor,
    rows: Var,
}

impl NewToken {
    /// Adds `token` with `vectors` rows to the text encoder, each initialised with the mean
    /// embedding of the tokens of `initializer`.
    pub(crate) fn attach(
        text: &mut dyn PromptEncoder,
        token: &str,
        vectors: usize,
        initializer: &str,
    ) -> Result<Self, TrainError> {
        if vectors == 0 {
            return Err(TrainError::Config(format!(
                "the token {token} needs at least one vector"
            )));
        }
        let init_ids = text.token_ids(initializer)?;
        if init_ids.is_empty() {
            return Err(TrainError::Config(format!(
                "initializer {initializer:?} has no tokens"
            )));
        }
        let base = text
            .token_embedding_mut()
            .ok_or_else(|| {
                TrainError::Config("the text encoder exposes no token embedding".into())
            })?
            .detach();
        let dev = base.device().clone();
        let init = base
            .index_select(&Tensor::new(init_ids.as_slice(), &dev)?, 0)?
            .to_dtype(DType::F32)?
            .mean_keepdim(0)?
            .repeat((vectors, 1))?;
        let ids = text.add_token(token, vectors)?;
        let first = base.dim(0)? as u32;
        if ids.first() != Some(&first) {
            return Err(TrainError::Config(format!(
                "{token} got the ids {ids:?}; the new rows start at {first}"
            )));
        }
        let new = Self {
            token: token.to_string(),
            ids,
            base,
            rows: Var::from_tensor(&init)?,
        };
        new.prepare(text)?;
        Ok(new)
    }

    /// Puts the base rows followed by the variable's current rows into the text encoder (after
    /// every update: the encoder holds a concatenation, not the variable itself).
    pub(crate) fn prepare(&self, text: &mut dyn PromptEncoder) -> Result<(), TrainError> {
        let emb = text.token_embedding_mut().ok_or_else(|| {
            TrainError::Config("the text encoder exposes no token embedding".into())
        })?;
        let rows = self.rows.as_tensor().to_dtype(self.base.dtype())?;
        *emb = Tensor::cat(&[&self.base, &rows], 0)?;
        Ok(())
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub(crate) fn rows(&self) -> &Var {
        &self.rows
    }
}

/// Textual Inversion settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextualInversionConfig {
    /// The new token, e.g. `<sks>`; the tokenizer must not have it.
    pub token: String,
    /// Embedding vectors of the token.
    #[serde(default = "one")]
    pub num_vectors: usize,
    /// The word whose (mean) token embedding initialises every vector, e.g. the class `dog`.
    pub initializer: String,
}

fn one() -> usize {
    1
}

/// Name of the trainable rows among a method's parameters.
pub const TOKEN_EMBEDDING: &str = "text_encoder.text_model.embeddings.token_embedding.new_rows";

/// Textual Inversion: only the new token's embedding rows learn.
pub struct TextualInversionMethod {
    cfg: TextualInversionConfig,
    token: Option<NewToken>,
}

impl TextualInversionMethod {
    pub fn new(cfg: TextualInversionConfig) -> Result<Self, TrainError> {
        if cfg.token.trim().is_empty() || cfg.token.contains(char::is_whitespace) {
            return Err(TrainError::Config(format!(
                "textual inversion needs a one-word token, not {:?}",
                cfg.token
            )));
        }
        if cfg.num_vectors == 0 {
            return Err(TrainError::Config(
                "textual inversion needs at least one vector".into(),
            ));
        }
        Ok(Self { cfg, token: None })
    }

    fn attached(&self) -> Result<&NewToken, TrainError> {
        self.token
            .as_ref()
            .ok_or_else(|| TrainError::Config("textual inversion is not attached".into()))
    }

    /// Token ids of the new token's vectors (empty before [`TrainingMethod::attach`]).
    pub fn token_ids(&self) -> &[u32] {
        self.token.as_ref().map_or(&[], |t| t.ids())
    }

    /// The learned rows `[n, hidden]`.
    pub fn learned(&self) -> Result<Tensor, TrainError> {
        Ok(self.attached()?.rows().as_tensor().copy()?)
    }
}

impl TrainingMethod for TextualInversionMethod {
    fn kind(&self) -> &'static str {
        ENTRY.kind
    }

    fn attach(&mut self, models: ModelsMut<'_>, _seed: u64) -> Result<(), TrainError> {
        if self.token.is_some() {
            return Err(TrainError::Config(
                "textual inversion is already attached".into(),
            ));
        }
        self.token = Some(NewToken::attach(
            models.text_encoder,
            &self.cfg.token,
            self.cfg.num_vectors,
            &self.cfg.initializer,
        )?);
        Ok(())
    }

    fn prepare(&self, models: ModelsMut<'_>) -> Result<(), TrainError> {
        self.attached()?.prepare(models.text_encoder)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.token
            .iter()
            .map(|t| (TOKEN_EMBEDDING.to_string(), t.rows().clone()))
            .collect()
    }

    fn trains_text_encoder(&self) -> bool {
        true
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({ "method": ENTRY.kind, "textual_inversion": self.cfg })
    }

    /// diffusers' `learned_embeds.safetensors` layout: one tensor `[n, hidden]` named by the
    /// token, read by `load_textual_inversion`.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError> {
        let token = self.attached()?;
        let mut tensors = BTreeMap::new();
        tensors.insert(token.token().to_string(), self.learned()?);
        let mut metadata = export_metadata(info);
        metadata.insert("format".into(), "pt".into());
        metadata.insert("sidbooth.method".into(), ENTRY.kind.into());
        metadata.insert(
            "sidbooth.num_vectors".into(),
            self.cfg.num_vectors.to_string(),
        );
        Ok(ExportedWeights { tensors, metadata })
    }

    fn write_output(
        &self,
        ctx: &ExportContext<'_>,
        dir: &Path,
    ) -> Result<Vec<PathBuf>, TrainError> {
        std::fs::create_dir_all(dir)?;
        let weights = self.export(ctx.info)?;
        weights.save(&dir.join(EMBEDS_FILE))?;
        let mut files = vec![PathBuf::from(EMBEDS_FILE)];
        if ctx.options.a1111 {
            let a1111 = ExportedWeights {
                tensors: BTreeMap::from([(A1111_KEY.to_string(), self.learned()?)]),
                metadata: weights.metadata.clone(),
            };
            let name = a1111_file(&self.cfg.token);
            a1111.save(&dir.join(&name))?;
            files.push(PathBuf::from(name));
        }
        Ok(files)
    }
}
