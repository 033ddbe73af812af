//! The CLIP byte-level BPE tokenizer that CLIP and Stable Diffusion 1.x / 2.x share.
//!
//! * [`tokenizer_json`] turns a `vocab.json` + `merges.txt` pair (Hugging Face's
//!   `CLIPTokenizer` layout) into a `tokenizers` definition that tokenizes as
//!   `CLIPTokenizerFast` does: NFC, whitespace collapsed, lower-cased, CLIP's split pattern,
//!   byte-level BPE with `</w>` word ends, start and end tokens around the text.
//! * [`clip_bpe`] is the real 49,408-token vocabulary, embedded, and [`count_tokens`] counts
//!   what the text encoder sees of a text: it reads [`CONTEXT_LENGTH`] tokens, start and end
//!   tokens included, and never trains on anything after that.

use std::sync::OnceLock;

use tokenizers::Tokenizer;

/// Tokens the CLIP text encoder reads, `<|startoftext|>` and `<|endoftext|>` included.
pub const CONTEXT_LENGTH: usize = 77;

pub const START: &str = "<|startoftext|>";
pub const END: &str = "<|endoftext|>";

const VOCAB_JSON: &str = include_str!("../assets/vocab.json");
const MERGES_TXT: &str = include_str!("../assets/merges.txt");

#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(pub String);

fn err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError(e.to_string())
}

/// The `tokenizer.json` of `CLIPTokenizerFast` for this vocabulary (JSON text) and merges.
pub fn tokenizer_json(vocab_json: &str, merges_txt: &str) -> Result<String, TokenizerError> {
    let vocab: serde_json::Value = serde_json::from_str(vocab_json).map_err(err)?;
    let id = |token: &str| {
        vocab
            .get(token)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| err(format!("the vocabulary has no {token}")))
    };
    let (start_id, end_id) = (id(START)?, id(END)?);
    let merges: Vec<&str> = merges_txt
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let special = |content: &str, id: u64| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let definition = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(START, start_id), special(END, end_id)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [END, end_id], "cls": [START, start_id], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": END, "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Ok(definition.to_string())
}

/// The real CLIP vocabulary, built on first use (about 50 ms) and shared.
pub fn clip_bpe() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        tokenizer_json(VOCAB_JSON, MERGES_TXT)
            .and_then(|json| json.parse::<Tokenizer>().map_err(err))
            .expect("the embedded CLIP vocabulary is valid")
    })
}

/// How much of a text the CLIP text encoder reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCount {
    /// Tokens of the whole text, start and end tokens included.
    pub tokens: usize,
    /// The words after the [`CONTEXT_LENGTH`] cut, when the text is longer than that.
    pub cut: Option<String>,
}

impl TokenCount {
    pub fn fits(&self) -> bool {
        self.cut.is_none()
    }
}

/// Counts `text` with the real CLIP vocabulary.
pub fn count_tokens(text: &str) -> TokenCount {
    count_with(clip_bpe(), text)
}

/// Counts `text` with a given CLIP tokenizer (one made by [`tokenizer_json`]).
pub fn count_with(tokenizer: &Tokenizer, text: &str) -> TokenCount {
    let encoding = match tokenizer.encode(text, false) {
        Ok(e) => e,
        // The BPE has a token for every byte, so this does not happen; count characters then.
        Err(_) => {
            return TokenCount {
                tokens: text.chars().count() + 2,
                cut: None,
            }
        }
    };
    let content = encoding.len();
    let tokens = content + 2;
    let room = CONTEXT_LENGTH - 2;
    let cut = (content > room).then(|| {
        let offsets = encoding.get_offsets();
        let start = offsets[room].0;
        text[start..].trim().to_owned()
    });
    TokenCount { tokens, cut }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(text: &str) -> Vec<u32> {
        clip_bpe().encode(text, true).unwrap().get_ids().to_vec()
    }

    #[test]
    fn matches_transformers_clip_tokenizer() {
        // Ids from transformers' CLIPTokenizer (openai/clip-vit-base-patch32).
        assert_eq!(
            ids("a photo of a cat"),
            [49406, 320, 1125, 539, 320, 2368, 49407]
        );
        assert_eq!(
            ids("a photo of sks dog sitting next to a black leather purse"),
            [49406, 320, 1125, 539, 48136, 1929, 4919, 1131, 531, 320, 1449, 5862, 16480, 49407]
        );
        assert_eq!(
            ids("A painting in the style of sks art"),
            [49406, 320, 3086, 530, 518, 1844, 539, 48136, 794, 49407]
        );
    }

    #[test]
    fn counts_include_start_and_end_and_name_the_cut() {
        let short = count_tokens("a photo of a cat");
        assert_eq!(
            short,
            TokenCount {
                tokens: 7,
                cut: None
            }
        );
        assert!(short.fits());
        // 80 words of one token each: 75 fit, the last five are cut.
        let long = count_tokens(&format!(
            "{} {}",
            ["dog"; 75].join(" "),
            ["cat"; 5].join(" ")
        ));
        assert_eq!(long.tokens, 82);
        assert_eq!(long.cut.as_deref(), Some("cat cat cat cat cat"));
        let exact = count_tokens(&["dog"; 75].join(" "));
        assert_eq!(
            exact,
            TokenCount {
                tokens: 77,
                cut: None
            }
        );
    }
}
