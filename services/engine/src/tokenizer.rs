//! CLIP BPE tokenizer through the `tokenizers` crate, padded to 77 tokens as SD pipelines do.

use std::path::Path;

use sidbooth_tokenizer::{END, START};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// CLIP tokenizer with SD's fixed-length padding.
#[derive(Clone)]
pub struct ClipTokenizer {
    tok: Tokenizer,
    pub max_length: usize,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// Multi-vector tokens: the id a prompt's token has and the ids it stands for.
    expansions: Vec<(u32, Vec<u32>)>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// The `tokenizer.json` of CLIPTokenizerFast for a given vocab (JSON text) and merges (text).
pub fn tokenizer_json(vocab_json: &str, merges_txt: &str) -> Result<String> {
    sidbooth_tokenizer::tokenizer_json(vocab_json, merges_txt).map_err(tk_err)
}

fn pad_token_from_dir(dir: &Path) -> Option<String> {
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(s) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&s) else {
            continue;
        };
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Some(s.clone()),
            Some(o) => {
                if let Some(c) = o.get("content").and_then(|c| c.as_str()) {
                    return Some(c.to_string());
                }
            }
            None => {}
        }
    }
    None
}

impl ClipTokenizer {
    /// Wraps a tokenizer; `pad_token` defaults to `<|endoftext|>` (SD 1.x); SD 2.x uses `!`.
    pub fn new(tok: Tokenizer, pad_token: Option<&str>) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| tk_err(format!("token {t} not in vocabulary")))
        };
        let bos_id = id(START)?;
        let eos_id = id(END)?;
        let pad_id = match pad_token {
            Some(p) => id(p).or_else(|_| id(&format!("{p}</w>")))?,
            None => eos_id,
        };
        Ok(Self {
            tok,
            max_length: 77,
            bos_id,
            eos_id,
            pad_id,
            expansions: Vec::new(),
        })
    }

    /// `tokenizer/` of a model directory: `tokenizer.json`, else `vocab.json` + `merges.txt`; the
    /// pad token from `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tj = dir.join("tokenizer.json");
        let tok = if tj.exists() {
            Tokenizer::from_file(&tj).map_err(tk_err)?
        } else {
            let vocab = std::fs::read_to_string(dir.join("vocab.json"))?;
            let merges = std::fs::read_to_string(dir.join("merges.txt"))?;
            tokenizer_json(&vocab, &merges)?
                .parse::<Tokenizer>()
                .map_err(tk_err)?
        };
        let pad = pad_token_from_dir(dir);
        Self::new(tok, pad.as_deref())
    }

    pub fn from_vocab_merges(
        vocab_json: &str,
        merges_txt: &str,
        pad_token: Option<&str>,
    ) -> Result<Self> {
        let tok = tokenizer_json(vocab_json, merges_txt)?
            .parse::<Tokenizer>()
            .map_err(tk_err)?;
        Self::new(tok, pad_token)
    }

    /// Adds a whole-word token (e.g. a textual-inversion placeholder `<sks>`) and returns its id;
    /// an existing token keeps its id. New ids follow the vocabulary (`vocab_size() - 1`).
    pub fn add_token(&mut self, token: &str) -> Result<u32> {
        if let Some(id) = self.tok.token_to_id(token) {
            return Ok(id);
        }
        self.tok
            .add_tokens(&[tokenizers::AddedToken::from(token.to_string(), false)]);
        self.tok
            .token_to_id(token)
            .ok_or_else(|| tk_err(format!("could not add token {token}")))
    }

    /// Adds a new token with `vectors` embedding rows in diffusers' multi-vector convention
    /// (`load_textual_inversion`, `textual_inversion.py`): `token`, `token_1`, ...,
    /// `token_{vectors-1}`, and a prompt's `token` stands for all of them. Returns their ids,
    /// consecutive after the vocabulary. A token the vocabulary already has is refused, as
    /// diffusers refuses it: its embedding would be replaced for every prompt that uses it.
    pub fn add_multi_vector_token(&mut self, token: &str, vectors: usize) -> Result<Vec<u32>> {
        if vectors == 0 {
            return Err(tk_err(format!("token {token} needs at least one vector")));
        }
        let names: Vec<String> = std::iter::once(token.to_string())
            .chain((1..vectors).map(|i| format!("{token}_{i}")))
            .collect();
        if let Some(n) = names.iter().find(|n| self.tok.token_to_id(n).is_some()) {
            return Err(tk_err(format!("the tokenizer already has the token {n}")));
        }
        let ids = names
            .iter()
            .map(|n| self.add_token(n))
            .collect::<Result<Vec<u32>>>()?;
        if ids.len() > 1 {
            self.expansions.push((ids[0], ids.clone()));
        }
        Ok(ids)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Token ids without start/end tokens; a multi-vector token gives all its ids.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let e = self.tok.encode(text, false).map_err(tk_err)?;
        if self.expansions.is_empty() {
            return Ok(e.get_ids().to_vec());
        }
        let mut ids = Vec::with_capacity(e.get_ids().len());
        for &id in e.get_ids() {
            match self.expansions.iter().find(|(first, _)| *first == id) {
                Some((_, all)) => ids.extend_from_slice(all),
                None => ids.push(id),
            }
        }
        Ok(ids)
    }

    /// `<|startoftext|> tokens… <|endoftext|> pad…`, exactly `max_length` ids (truncated as CLIPTokenizer).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenize(prompt)?;
        ids.truncate(self.max_length - 2);
        let mut out = Vec::with_capacity(self.max_length);
        out.push(self.bos_id);
        out.extend(ids);
        out.push(self.eos_id);
        out.resize(self.max_length, self.pad_id);
        Ok(out)
    }

    /// Positions (in the padded sequence from [`encode`](Self::encode)) of every token of every
    /// occurrence of `word` in `prompt`; a word split into several BPE tokens gives all of them.
    pub fn token_positions(&self, prompt: &str, word: &str) -> Result<Vec<usize>> {
        let ids = self.encode(prompt)?;
        let w = self.tokenize(word)?;
        if w.is_empty() {
            return Ok(Vec::new());
        }
        let mut pos = Vec::new();
        let mut i = 1;
        while i + w.len() <= ids.len() {
            if ids[i..i + w.len()] == w[..] {
                pos.extend(i..i + w.len());
                i += w.len();
            } else {
                i += 1;
            }
        }
        Ok(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-tokenizer")
    }

    #[test]
    fn tiny_tokenizer_matches_full_vocab_prefix() {
        let t = ClipTokenizer::from_dir(reference_dir()).unwrap();
        let ids = t.encode("a photo of a cat").unwrap();
        assert_eq!(ids.len(), 77);
        // "a" "photo" "of" "a" "cat" are among the first merges of the CLIP vocabulary
        assert_eq!(&ids[..7], &[t.bos_id, 320, 1125, 539, 320, 2368, t.eos_id]);
        assert!(ids[7..].iter().all(|&i| i == t.pad_id));
    }

    #[test]
    fn positions_of_identifier() {
        let t = ClipTokenizer::from_dir(reference_dir()).unwrap();
        let p = t.token_positions("a photo of sks dog", "sks").unwrap();
        assert!(!p.is_empty());
        assert_eq!(p[0], 4);
        let ids = t.encode("a photo of sks dog").unwrap();
        let w = t.tokenize("sks").unwrap();
        assert_eq!(p.iter().map(|&i| ids[i]).collect::<Vec<_>>(), w);
        assert!(t
            .token_positions("a photo of a dog", "sks")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn added_token_is_one_id() {
        let mut t = ClipTokenizer::from_dir(reference_dir()).unwrap();
        let n = t.vocab_size();
        let id = t.add_token("<sks>").unwrap();
        assert_eq!(id as usize, n);
        assert_eq!(t.add_token("<sks>").unwrap(), id);
        let ids = t.encode("a photo of <sks> dog").unwrap();
        assert_eq!(ids[4], id);
        assert_eq!(
            t.token_positions("a photo of <sks> dog", "<sks>").unwrap(),
            vec![4]
        );
    }

    #[test]
    fn multi_vector_token_expands_in_prompts() {
        let mut t = ClipTokenizer::from_dir(reference_dir()).unwrap();
        let n = t.vocab_size() as u32;
        let ids = t.add_multi_vector_token("<sks>", 3).unwrap();
        assert_eq!(ids, vec![n, n + 1, n + 2]);
        // diffusers' maybe_convert_prompt: "<sks>" becomes "<sks> <sks>_1 <sks>_2"
        let dog = t.tokenize("dog").unwrap();
        assert_eq!(
            t.tokenize("<sks> dog").unwrap(),
            [&ids[..], &dog[..]].concat()
        );
        assert_eq!(
            t.token_positions("a photo of <sks> dog", "<sks>").unwrap(),
            vec![4, 5, 6]
        );
        assert!(t.add_multi_vector_token("<sks>", 1).is_err());
        assert!(t.add_multi_vector_token("<sks>_2", 1).is_err());
        assert_eq!(t.vocab_size() as u32, n + 3);
    }

    #[test]
    fn long_prompts_are_truncated_with_eos() {
        let t = ClipTokenizer::from_dir(reference_dir()).unwrap();
        let long = "cat ".repeat(200);
        let ids = t.encode(&long).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], t.eos_id);
    }
}
