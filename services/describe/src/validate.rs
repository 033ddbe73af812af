//! Validation (and light repair) of one train description.
//!
//! The same pure function checks VLM output, manual texts and texts a user edited during review:
//! [`validate_description`]. It returns the normalised text or a typed [`DescriptionProblem`]
//! with a stable machine [`code`](DescriptionProblem::code) and a human message (`Display`).
//!
//! # What is repaired
//! - surrounding whitespace; inner whitespace and line breaks collapsed to single spaces;
//! - a code fence, wrapping quotes (`"…"`, `'…'`, `“…”`, `` `…` ``), markdown emphasis
//!   (`**`, `__`), a heading mark, a single leading bullet, and a leading label such as
//!   `Caption:` or `Description:`;
//! - the prefix in another letter case ("A photo of sks dog" becomes "a photo of sks dog");
//! - a prefix written in quotes (`"a photo of sks dog" sitting …`);
//! - a missing or slightly different lead-in before a correct "{token} {class}" at the start
//!   ("sks dog sitting …", "A sks dog sitting …", "A photo of a sks dog …") is replaced by the
//!   prefix. Only these lead-ins are repaired: the text must start with "{token} {class}" after
//!   at most an article or the prefix's own words; anything else is `missing_prefix`, because
//!   inserting the prefix into a sentence that does not begin with the subject changes its
//!   meaning;
//! - for `class_only`, a trailing full stop after the prefix.
//!
//! # What is refused
//! See [`DescriptionProblem`]; each variant's documentation gives the rule.
//!
//! # The "describes the subject" heuristic and its limits
//! For the `sid` and `class_names` cases in object mode, the words after each reference to the
//! subject are scanned up to the next boundary: punctuation, a preposition of place ("on",
//! "in", "beside" …), a conjunction ("and", "while", "which" …), a verb that attaches another
//! object ("wearing", "holding" …), or eight words. What counts depends on the reference:
//! - after "{token} {class}": a colour, an appearance word (body words such as "fur", "coat",
//!   "fluffy", "breed"; generic ones such as "spotted", "pattern", "texture", size words) or a
//!   breed name. A comma does not end this scan, and an article right after the comma is
//!   skipped, so appositions are caught ("sks dog, brown and fluffy", "sks dog, a golden
//!   retriever"). Any other determiner ("a", "the", "another" …) starts another object: from
//!   there on only body words and breeds count ("sks dog with a shaggy coat" is refused,
//!   "sks dog with a red ball" is not);
//! - after "the/this/that {class}" (also "the dog's"): appearance words and breeds, not
//!   colours; a determiner ends the scan;
//! - after "it"/"its": body words and breeds only, because these pronouns often mean another
//!   object ("a vase with its blue flowers", "behind it is a wall with a floral pattern").
//!
//! Transient states are allowed: pose, gaze, expression ("sitting with its tongue out", "eyes
//! closed"). Limits: the scan knows no grammar. It misses appearance written far from a
//! reference ("sks dog sitting on a sofa, looking fluffy"), through a determiner after a
//! pronoun ("it has a spotted coat"), through "he", "she" or "they" (not treated as references
//! because they usually mean a person in the photo), by words not in the lists (rare colours,
//! most breed names) or in another language. It can refuse a correct text where a colour
//! without an article follows the subject phrase but belongs to another object ("sks dog
//! sitting with red ball"), or where a body word after "it"/"its" or a determiner belongs to
//! another object ("sks dog with a fluffy toy"). Users can edit such texts during review.
//!
//! In style mode the "subject" is the painting style: for `sid` and `class_names`, any style
//! word after the prefix ("brushstrokes", "impressionist", "watercolour", "palette", "style"
//! …) is refused as `describes_style`. The same limits apply: the list is not complete.
//!
//! `full` describes the subject on purpose and is not scanned.

use sidbooth_domain::spec::MAX_DESCRIPTION_CHARS;
use sidbooth_domain::{DescriptionCase, IdentifierToken, JobSpec, Mode, SubjectClass};

use sidbooth_tokenizer::{count_tokens, CONTEXT_LENGTH};

use crate::instructions::{self, Instruction, ASKED_MAX_SENTENCES};

/// Sentences allowed in one description: the instructions ask for at most
/// [`ASKED_MAX_SENTENCES`]; one more is tolerated.
pub const DEFAULT_MAX_SENTENCES: usize = ASKED_MAX_SENTENCES + 1;

/// What a description is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptionRules {
    pub case: DescriptionCase,
    pub mode: Mode,
    pub token: IdentifierToken,
    pub class: SubjectClass,
    /// Upper bound in characters, after repair. Default [`MAX_DESCRIPTION_CHARS`].
    pub max_chars: usize,
    /// Upper bound on sentences. Default [`DEFAULT_MAX_SENTENCES`].
    pub max_sentences: usize,
    /// Upper bound in CLIP tokens, start and end tokens included: what the text encoder reads.
    /// Default [`CONTEXT_LENGTH`].
    pub max_tokens: usize,
}

impl DescriptionRules {
    pub fn new(
        case: DescriptionCase,
        mode: Mode,
        token: IdentifierToken,
        class: SubjectClass,
    ) -> Self {
        Self {
            case,
            mode,
            token,
            class,
            max_chars: MAX_DESCRIPTION_CHARS,
            max_sentences: DEFAULT_MAX_SENTENCES,
            max_tokens: CONTEXT_LENGTH,
        }
    }

    /// The rules for the descriptions of one job.
    pub fn for_spec(spec: &JobSpec) -> Self {
        Self::new(
            spec.descriptions.case,
            spec.mode,
            spec.token.clone(),
            spec.subject_class.clone(),
        )
    }

    /// The fixed start of every description, from [`Mode::prefix`].
    pub fn prefix(&self) -> String {
        self.mode.prefix(&self.token, &self.class)
    }

    /// The instruction a model gets for these rules.
    pub fn instruction(&self) -> Instruction {
        instructions::instruction_for(self.case, self.mode, &self.token, &self.class)
    }

    /// The description when no model is needed (`class_only`): the prefix alone.
    pub fn fixed_description(&self) -> Option<String> {
        instructions::fixed_description(self.case, self.mode, &self.token, &self.class)
    }
}

/// Why a description was refused. [`code`](Self::code) is stable and meant for machines (API
/// problem details, metrics); `Display` is the message for people, also sent back to the model
/// when the client asks it for a corrected answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptionProblem {
    /// Nothing (but the prefix) is left after repair. Not a problem for `class_only`.
    #[error("the description is empty; after \"{prefix}\" it must describe the photo")]
    Empty { prefix: String },
    /// Several lines that are list items; a description is running text.
    #[error("the description is a list of {items} items; write running text instead")]
    NotPlainText { items: usize },
    /// The text does not start with the fixed prefix and could not be repaired.
    #[error("the description must start with \"{expected}\"")]
    MissingPrefix { expected: String },
    /// `class_only` allows exactly the prefix.
    #[error("for the class_only case the description must be exactly \"{expected}\"")]
    NotPrefixOnly { expected: String },
    #[error("the description has {chars} characters; at most {max} are allowed")]
    TooLong { chars: usize, max: usize },
    #[error("the description has {count} sentences; at most {max} are allowed")]
    TooManySentences { count: usize, max: usize },
    /// Longer than the CLIP text encoder reads: the words after the cut would never train.
    #[error(
        "the description has {tokens} CLIP tokens but the text encoder reads only {max}, so \
         \"{cut}\" would be ignored; shorten it to about {words} words"
    )]
    TooManyTokens {
        tokens: usize,
        max: usize,
        cut: String,
        words: usize,
    },
    /// The identifier token must appear exactly once, as a whole word, in "{token} {class}".
    #[error(
        "the identifier \"{token}\" must appear exactly once, in \"{token} {class}\" at the \
         start; it appears {found} times"
    )]
    TokenCount {
        token: String,
        class: String,
        found: usize,
    },
    /// A sentence describes the subject's own appearance (cases `sid` and `class_names`).
    #[error(
        "the description must not describe the {subject} itself, only its pose or expression \
         and everything around it; \"{word}\" in \"{phrase}\" describes the {subject}"
    )]
    DescribesSubject {
        subject: String,
        word: String,
        phrase: String,
    },
    /// Style mode: the text describes the painting style (cases `sid` and `class_names`).
    #[error(
        "the description must describe what the image depicts, not its style; remove \"{word}\""
    )]
    DescribesStyle { word: String },
}

impl DescriptionProblem {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            DescriptionProblem::Empty { .. } => "empty",
            DescriptionProblem::NotPlainText { .. } => "not_plain_text",
            DescriptionProblem::MissingPrefix { .. } => "missing_prefix",
            DescriptionProblem::NotPrefixOnly { .. } => "not_prefix_only",
            DescriptionProblem::TooLong { .. } => "too_long",
            DescriptionProblem::TooManySentences { .. } => "too_many_sentences",
            DescriptionProblem::TooManyTokens { .. } => "too_many_tokens",
            DescriptionProblem::TokenCount { .. } => "token_count",
            DescriptionProblem::DescribesSubject { .. } => "describes_subject",
            DescriptionProblem::DescribesStyle { .. } => "describes_style",
        }
    }

    /// Every code [`code`](Self::code) can return, e.g. for documentation.
    pub const CODES: [&'static str; 10] = [
        "empty",
        "not_plain_text",
        "missing_prefix",
        "not_prefix_only",
        "too_long",
        "too_many_sentences",
        "too_many_tokens",
        "token_count",
        "describes_subject",
        "describes_style",
    ];

    /// The human message (same as `Display`).
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// Validates one description against `rules`, repairing what can be repaired (see the module
/// documentation). Returns the text to store.
pub fn validate_description(
    text: &str,
    rules: &DescriptionRules,
) -> Result<String, DescriptionProblem> {
    let prefix = rules.prefix();
    let normalised = normalise(text)?;
    if normalised.is_empty() {
        return Err(DescriptionProblem::Empty { prefix });
    }
    let text = repair_prefix(&normalised, rules, &prefix)?;
    let rest = &text[prefix.len()..];

    if rules.case == DescriptionCase::ClassOnly {
        let rest = rest.trim_end_matches('.').trim();
        return if rest.is_empty() {
            Ok(prefix)
        } else {
            Err(DescriptionProblem::NotPrefixOnly { expected: prefix })
        };
    }
    if !rest.chars().any(char::is_alphanumeric) {
        return Err(DescriptionProblem::Empty { prefix });
    }

    let chars = text.chars().count();
    if chars > rules.max_chars {
        return Err(DescriptionProblem::TooLong {
            chars,
            max: rules.max_chars,
        });
    }
    let sentences = count_sentences(&text);
    if sentences > rules.max_sentences {
        return Err(DescriptionProblem::TooManySentences {
            count: sentences,
            max: rules.max_sentences,
        });
    }
    let count = count_tokens(&text);
    if count.tokens > rules.max_tokens {
        let words = text.split_whitespace().count();
        return Err(DescriptionProblem::TooManyTokens {
            tokens: count.tokens,
            max: rules.max_tokens,
            cut: count.cut.unwrap_or_default(),
            // Scale the word count by what fits, with a margin for the model's estimate.
            words: words * (rules.max_tokens - 2) / count.tokens.max(1) * 9 / 10,
        });
    }

    let tokens = lex(&text);
    let token = rules.token.as_str();
    let found = tokens
        .iter()
        .filter(|t| matches!(t, Tok::Word(w) if w == token))
        .count();
    if found != 1 {
        return Err(DescriptionProblem::TokenCount {
            token: token.to_owned(),
            class: rules.class.to_string(),
            found,
        });
    }

    if matches!(
        rules.case,
        DescriptionCase::Sid | DescriptionCase::ClassNames
    ) {
        match rules.mode {
            Mode::Object => check_subject(&tokens, rules)?,
            Mode::Style => check_style(&lex(rest))?,
        }
    }
    Ok(text)
}

// ---------------------------------------------------------------------------------------------
// Normalisation

const LABELS: [&str; 7] = [
    "caption:",
    "description:",
    "train description:",
    "training caption:",
    "image description:",
    "sid:",
    "answer:",
];

const QUOTE_PAIRS: [(char, char); 6] = [
    ('"', '"'),
    ('\'', '\''),
    ('\u{201c}', '\u{201d}'),
    ('\u{2018}', '\u{2019}'),
    ('`', '`'),
    ('\u{ab}', '\u{bb}'),
];

fn bullet_len(line: &str) -> Option<usize> {
    let line = line.trim_start();
    for b in ["- ", "* ", "\u{2022} ", "+ "] {
        if line.starts_with(b) {
            return Some(b.len());
        }
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && digits < 3 {
        let after = &line[digits..];
        if after.starts_with(". ") || after.starts_with(") ") {
            return Some(digits + 2);
        }
    }
    None
}

fn normalise(raw: &str) -> Result<String, DescriptionProblem> {
    let mut text = raw.trim().to_owned();

    // A code fence around the answer.
    if let Some(inner) = text.strip_prefix("```") {
        let inner = inner.split_once('\n').map_or("", |(_, body)| body);
        text = inner.trim_end().trim_end_matches("```").trim().to_owned();
    }

    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let items = lines.iter().filter(|l| bullet_len(l).is_some()).count();
    if items >= 2 {
        return Err(DescriptionProblem::NotPlainText { items });
    }

    let mut text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    text = text.replace("**", "").replace("__", "");
    loop {
        let before = text.clone();
        let trimmed = text.trim_start_matches('#').trim();
        let mut t = trimmed.to_owned();
        if let Some(n) = bullet_len(&t) {
            t = t[n..].trim().to_owned();
        }
        for label in LABELS {
            if t.len() >= label.len()
                && t.is_char_boundary(label.len())
                && t[..label.len()].eq_ignore_ascii_case(label)
            {
                t = t[label.len()..].trim().to_owned();
            }
        }
        t = strip_wrapping_quotes(&t).trim().to_owned();
        text = t;
        if text == before {
            break;
        }
    }
    Ok(text)
}

fn strip_wrapping_quotes(text: &str) -> &str {
    for (open, close) in QUOTE_PAIRS {
        let Some(inner) = text.strip_prefix(open) else {
            continue;
        };
        // `"text".` counts as wrapped too.
        let inner_end = inner.strip_suffix('.').unwrap_or(inner);
        for candidate in [inner, inner_end] {
            if let Some(body) = candidate.strip_suffix(close) {
                // Not wrapped if a quote opens inside (`"a" and "b"`); an apostrophe inside a
                // word (`dog's`) is no opening quote.
                if !opens_quote_inside(body, open) {
                    return body;
                }
            }
        }
    }
    text
}

fn opens_quote_inside(body: &str, open: char) -> bool {
    let mut prev: Option<char> = None;
    for c in body.chars() {
        if c == open && prev.is_none_or(char::is_whitespace) {
            return true;
        }
        prev = Some(c);
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Prefix

fn starts_with_ci(text: &str, prefix: &str) -> bool {
    text.len() >= prefix.len()
        && text.is_char_boundary(prefix.len())
        && text[..prefix.len()].eq_ignore_ascii_case(prefix)
        && !text[prefix.len()..]
            .chars()
            .next()
            .is_some_and(char::is_alphanumeric)
}

/// Lead-ins that may stand before "{token} {class}" and are replaced by the prefix.
fn accepted_lead_ins(prefix: &str, subject: &str) -> Vec<String> {
    let body = prefix
        .strip_suffix(subject)
        .unwrap_or(prefix)
        .trim()
        .to_owned();
    let body_no_article = body
        .strip_prefix("a ")
        .or_else(|| body.strip_prefix("an "))
        .unwrap_or(&body)
        .to_owned();
    let mut leads = vec![String::new(), "a".into(), "an".into(), "the".into()];
    for b in [body, body_no_article] {
        for article in ["", " a", " an", " the"] {
            leads.push(format!("{b}{article}"));
        }
    }
    leads
}

fn repair_prefix(
    text: &str,
    rules: &DescriptionRules,
    prefix: &str,
) -> Result<String, DescriptionProblem> {
    let missing = || DescriptionProblem::MissingPrefix {
        expected: prefix.to_owned(),
    };
    if starts_with_ci(text, prefix) {
        return Ok(format!("{prefix}{}", &text[prefix.len()..]));
    }
    for (open, close) in QUOTE_PAIRS {
        if let Some(inner) = text.strip_prefix(open) {
            if starts_with_ci(inner, prefix) {
                if let Some(after) = inner[prefix.len()..].strip_prefix(close) {
                    return Ok(format!("{prefix}{after}"));
                }
            }
        }
    }
    let subject = format!("{} {}", rules.token, rules.class);
    let lower = text.to_ascii_lowercase();
    let Some(at) = find_phrase(&lower, &subject) else {
        return Err(missing());
    };
    let lead = lower[..at].split_whitespace().collect::<Vec<_>>().join(" ");
    if accepted_lead_ins(prefix, &subject).contains(&lead) {
        Ok(format!("{prefix}{}", &text[at + subject.len()..]))
    } else {
        Err(missing())
    }
}

/// Byte offset of the first whole-word occurrence of `phrase` (ASCII, lower case) in `lower`.
fn find_phrase(lower: &str, phrase: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = lower[from..].find(phrase) {
        let at = from + i;
        let before_ok = lower[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        let after_ok = lower[at + phrase.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_alphanumeric());
        if before_ok && after_ok {
            return Some(at);
        }
        from = at + phrase.len();
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Sentences and words

fn count_sentences(text: &str) -> usize {
    let mut count = 0;
    let mut has_content = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() {
            has_content = true;
        }
        if matches!(c, '.' | '!' | '?') {
            while chars.peek().is_some_and(|n| matches!(n, '.' | '!' | '?')) {
                chars.next();
            }
            let ends = chars.peek().is_none_or(|n| n.is_whitespace());
            if ends && has_content {
                count += 1;
                has_content = false;
            }
        }
    }
    if has_content {
        count += 1;
    }
    count
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// A word in lower case: a run of letters and digits.
    Word(String),
    /// A punctuation mark that ends a phrase.
    Punct(char),
}

fn lex(text: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
            continue;
        }
        if !word.is_empty() {
            out.push(Tok::Word(std::mem::take(&mut word)));
        }
        if matches!(
            c,
            ',' | ';'
                | ':'
                | '.'
                | '!'
                | '?'
                | '('
                | ')'
                | '['
                | ']'
                | '"'
                | '\u{2013}'
                | '\u{2014}'
        ) {
            out.push(Tok::Punct(c));
        }
    }
    if !word.is_empty() {
        out.push(Tok::Word(word));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Subject and style heuristics

const COLOURS: &[&str] = &[
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "violet",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gray",
    "golden",
    "gold",
    "silver",
    "beige",
    "tan",
    "cream",
    "ginger",
    "chestnut",
    "chocolate",
    "fawn",
    "apricot",
    "blonde",
    "blond",
    "ivory",
    "navy",
    "teal",
    "turquoise",
    "maroon",
    "magenta",
    "khaki",
    "copper",
    "bronze",
    "charcoal",
    "caramel",
    "russet",
    "sandy",
    "tricolor",
    "tricolour",
    "multicolored",
    "multicoloured",
    "bicolor",
    "bicolour",
    "reddish",
    "brownish",
    "greyish",
    "grayish",
    "whitish",
    "blackish",
    "yellowish",
];

/// Words that describe an animal's or toy's body; rarely about anything else.
const BODY: &[&str] = &[
    "fur",
    "furry",
    "furred",
    "coat",
    "coated",
    "hair",
    "haired",
    "hairy",
    "mane",
    "feathers",
    "feathered",
    "plumage",
    "scales",
    "scaly",
    "markings",
    "fluffy",
    "fuzzy",
    "shaggy",
    "curly",
    "wiry",
    "brindle",
    "merle",
    "tabby",
    "calico",
    "tortoiseshell",
    "piebald",
    "breed",
];

/// Appearance words that fit any object (so they count only right after the subject).
const GENERIC: &[&str] = &[
    "marking",
    "marked",
    "spots",
    "spotted",
    "spotty",
    "stripes",
    "striped",
    "stripy",
    "patches",
    "patched",
    "patchy",
    "speckled",
    "dappled",
    "wavy",
    "sleek",
    "silky",
    "glossy",
    "scruffy",
    "woolly",
    "wooly",
    "plush",
    "coloured",
    "colored",
    "colouring",
    "coloring",
    "coloration",
    "colouration",
    "colour",
    "color",
    "texture",
    "textured",
    "fabric",
    "material",
    "pattern",
    "patterned",
    "freckled",
    "floppy",
    "pointy",
    "muscular",
    "slender",
    "chubby",
    "plump",
    "small",
    "large",
    "big",
    "tiny",
    "huge",
];

const BREEDS: &[&str] = &[
    "retriever",
    "labrador",
    "poodle",
    "terrier",
    "husky",
    "shepherd",
    "beagle",
    "bulldog",
    "chihuahua",
    "dachshund",
    "pug",
    "spaniel",
    "collie",
    "corgi",
    "shiba",
    "maltese",
    "pomeranian",
    "samoyed",
    "schnauzer",
    "goldendoodle",
    "labradoodle",
    "siamese",
    "persian",
    "ragdoll",
    "sphynx",
    "rottweiler",
    "doberman",
    "greyhound",
    "whippet",
    "mastiff",
    "akita",
    "malamute",
    "dalmatian",
    "setter",
    "hound",
    "yorkie",
    "bichon",
    "havanese",
    "papillon",
    "westie",
    "chow",
    "tzu",
];

/// Determiners: they introduce another object.
const DETERMINERS: &[&str] = &[
    "a", "an", "the", "another", "some", "two", "three", "several", "other", "this", "that",
    "these", "those",
];

/// Words that end the scan after a subject reference: prepositions of place, conjunctions and
/// verbs that attach another object.
const BOUNDARIES: &[&str] = &[
    "on",
    "in",
    "at",
    "by",
    "near",
    "beside",
    "behind",
    "under",
    "underneath",
    "above",
    "below",
    "against",
    "next",
    "between",
    "among",
    "inside",
    "outside",
    "onto",
    "into",
    "from",
    "to",
    "toward",
    "towards",
    "across",
    "along",
    "over",
    "around",
    "through",
    "beneath",
    "atop",
    "and",
    "or",
    "but",
    "while",
    "as",
    "which",
    "who",
    "where",
    "when",
    "wearing",
    "holding",
    "carrying",
    "chewing",
    "eating",
    "playing",
    "biting",
    "sniffing",
    "watching",
    "looking",
    "facing",
    "surrounded",
];

const STYLE_WORDS: &[&str] = &[
    "style",
    "styled",
    "stylized",
    "stylised",
    "stylistic",
    "brushstroke",
    "brushstrokes",
    "brushwork",
    "strokes",
    "impasto",
    "palette",
    "impressionist",
    "impressionistic",
    "impressionism",
    "expressionist",
    "expressionism",
    "cubist",
    "cubism",
    "surrealist",
    "surrealism",
    "pointillist",
    "pointillism",
    "realism",
    "photorealistic",
    "watercolor",
    "watercolors",
    "watercolour",
    "watercolours",
    "gouache",
    "acrylic",
    "acrylics",
    "pastel",
    "pastels",
    "technique",
    "painterly",
    "sketchy",
    "cartoonish",
    "anime",
    "linework",
    "shading",
    "hatching",
    "crosshatching",
    "artist",
];

/// Which words count after a reference to the subject.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strength {
    /// Right after "{token} {class}": colours, body and generic appearance words, breeds.
    Phrase,
    /// After "the/this/that {class}": body and generic appearance words, breeds.
    Named,
    /// After "it"/"its", or after a determiner following the subject phrase ("sks dog with a
    /// shaggy coat"): body words and breeds only.
    Pronoun,
}

impl Strength {
    fn flags(self, word: &str) -> bool {
        BODY.contains(&word)
            || BREEDS.contains(&word)
            || (self != Strength::Pronoun && GENERIC.contains(&word))
            || (self == Strength::Phrase && COLOURS.contains(&word))
    }
}

fn words_of(s: &str) -> Vec<String> {
    lex(s)
        .into_iter()
        .filter_map(|t| match t {
            Tok::Word(w) => Some(w),
            Tok::Punct(_) => None,
        })
        .collect()
}

fn matches_at(tokens: &[Tok], at: usize, words: &[String]) -> bool {
    words
        .iter()
        .enumerate()
        .all(|(k, w)| matches!(tokens.get(at + k), Some(Tok::Word(t)) if t == w))
}

fn check_subject(tokens: &[Tok], rules: &DescriptionRules) -> Result<(), DescriptionProblem> {
    let token = rules.token.as_str().to_owned();
    let class_words = words_of(rules.class.as_str());
    let mut subject_words = vec![token];
    subject_words.extend(class_words.iter().cloned());

    let mut i = 0;
    while i < tokens.len() {
        let reference = if matches_at(tokens, i, &subject_words) {
            Some((i + subject_words.len(), Strength::Phrase))
        } else if matches!(&tokens[i], Tok::Word(w) if w == "it" || w == "its") {
            Some((i + 1, Strength::Pronoun))
        } else if matches!(&tokens[i], Tok::Word(w) if w == "the" || w == "this" || w == "that")
            && matches_at(tokens, i + 1, &class_words)
        {
            Some((i + 1 + class_words.len(), Strength::Named))
        } else {
            None
        };
        let Some((start, strength)) = reference else {
            i += 1;
            continue;
        };
        if let Some(word) = scan_window(tokens, start, strength) {
            return Err(DescriptionProblem::DescribesSubject {
                subject: format!("{} {}", rules.token, rules.class),
                phrase: phrase_text(tokens, i, start, &word),
                word,
            });
        }
        i = start;
    }
    Ok(())
}

/// The first appearance word in the words after a reference, up to a boundary.
fn scan_window(tokens: &[Tok], start: usize, mut strength: Strength) -> Option<String> {
    let phrase = strength == Strength::Phrase;
    let mut words = 0;
    let mut after_comma = false;
    for tok in &tokens[start..] {
        match tok {
            Tok::Punct(',') if phrase => {
                after_comma = true;
                continue;
            }
            Tok::Punct(_) => return None,
            Tok::Word(w) => {
                let w = w.as_str();
                // An apposition after the subject phrase ("sks dog, a golden retriever") is
                // about the subject: an article right after the comma is skipped.
                let apposition = after_comma && matches!(w, "a" | "an");
                after_comma = false;
                if apposition {
                    continue;
                }
                if DETERMINERS.contains(&w) {
                    // Another object starts. After the subject phrase, keep looking for body
                    // words ("sks dog with a shaggy coat"); after other references, stop.
                    if phrase {
                        strength = Strength::Pronoun;
                        continue;
                    }
                    return None;
                }
                // A possessive "'s" ("the dog's fur") is the word "s" and continues the scan.
                if BOUNDARIES.contains(&w) {
                    return None;
                }
                if strength.flags(w) {
                    return Some(w.to_owned());
                }
                words += 1;
                if words >= 8 {
                    return None;
                }
            }
        }
    }
    None
}

fn phrase_text(tokens: &[Tok], from: usize, start: usize, word: &str) -> String {
    let mut out = Vec::new();
    for tok in &tokens[from..] {
        if let Tok::Word(w) = tok {
            out.push(w.as_str());
            if out.len() > start - from && w == word {
                break;
            }
        }
    }
    out.join(" ")
}

fn check_style(rest: &[Tok]) -> Result<(), DescriptionProblem> {
    for tok in rest {
        if let Tok::Word(w) = tok {
            if STYLE_WORDS.contains(&w.as_str()) {
                return Err(DescriptionProblem::DescribesStyle { word: w.clone() });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(case: DescriptionCase, mode: Mode, token: &str, class: &str) -> DescriptionRules {
        DescriptionRules::new(
            case,
            mode,
            IdentifierToken::parse(token).unwrap(),
            SubjectClass::parse(class).unwrap(),
        )
    }

    fn dog(case: DescriptionCase) -> DescriptionRules {
        rules(case, Mode::Object, "sks", "dog")
    }

    fn art(case: DescriptionCase) -> DescriptionRules {
        rules(case, Mode::Style, "sks", "art")
    }

    /// (input, expected output) pairs that must pass.
    fn assert_ok(rules: &DescriptionRules, table: &[(&str, &str)]) {
        for (input, expected) in table {
            match validate_description(input, rules) {
                Ok(out) => assert_eq!(&out, expected, "input {input:?}"),
                Err(p) => panic!("{:?} refused {input:?}: {p} ({})", rules.case, p.code()),
            }
        }
    }

    /// (input, expected code) pairs that must fail.
    fn assert_err(rules: &DescriptionRules, table: &[(&str, &str)]) {
        for (input, code) in table {
            match validate_description(input, rules) {
                Ok(out) => panic!("{:?} accepted {input:?} as {out:?}", rules.case),
                Err(p) => assert_eq!(p.code(), *code, "input {input:?}: {p}"),
            }
        }
    }

    #[test]
    fn sid_object_accepts_and_repairs() {
        let r = dog(DescriptionCase::Sid);
        let d = "a photo of sks dog sitting in front of an orange wall, with a grey wooden floor beneath.";
        assert_ok(
            &r,
            &[
                (d, d),
                (
                    "A Photo Of SKS Dog lying on a red plaid blanket.",
                    "a photo of sks dog lying on a red plaid blanket.",
                ),
                ("  \"a photo of sks dog   on green\n grass.\"  ", "a photo of sks dog on green grass."),
                ("\u{201c}a photo of sks dog on green grass.\u{201d}", "a photo of sks dog on green grass."),
                ("\"a photo of sks dog on green grass\".", "a photo of sks dog on green grass"),
                ("'a photo of sks dog on its owner's lap.'", "a photo of sks dog on its owner's lap."),
                (
                    "**a photo of sks dog** beside a black leather purse.",
                    "a photo of sks dog beside a black leather purse.",
                ),
                ("Caption: a photo of sks dog on a wooden bench.", "a photo of sks dog on a wooden bench."),
                ("```text\na photo of sks dog on a rug.\n```", "a photo of sks dog on a rug."),
                ("- a photo of sks dog on a rug.", "a photo of sks dog on a rug."),
                ("\"a photo of sks dog\" sitting on a rug.", "a photo of sks dog sitting on a rug."),
                ("sks dog sitting on a blue towel.", "a photo of sks dog sitting on a blue towel."),
                ("A sks dog sitting on a blue towel.", "a photo of sks dog sitting on a blue towel."),
                ("A photo of a sks dog next to a red ball.", "a photo of sks dog next to a red ball."),
                ("Photo of the sks dog on a red rug.", "a photo of sks dog on a red rug."),
                // Transient states of the subject are allowed.
                (
                    "a photo of sks dog with its tongue out and eyes closed, sitting on a brown leather sofa.",
                    "a photo of sks dog with its tongue out and eyes closed, sitting on a brown leather sofa.",
                ),
                // The class word may name another animal; colours of other objects are fine.
                (
                    "a photo of sks dog next to another dog with black fur on a green lawn.",
                    "a photo of sks dog next to another dog with black fur on a green lawn.",
                ),
                (
                    "a photo of sks dog in front of a vase with its blue flowers.",
                    "a photo of sks dog in front of a vase with its blue flowers.",
                ),
                (
                    "a photo of sks dog wearing a red collar. Behind it is a white brick wall. The floor is grey tile.",
                    "a photo of sks dog wearing a red collar. Behind it is a white brick wall. The floor is grey tile.",
                ),
                // Decimal points do not end sentences.
                (
                    "a photo of sks dog next to a 2.5 litre bottle.",
                    "a photo of sks dog next to a 2.5 litre bottle.",
                ),
            ],
        );
    }

    #[test]
    fn sid_object_refusals() {
        let r = dog(DescriptionCase::Sid);
        let long = format!("a photo of sks dog{}.", " next to a red ball".repeat(60));
        assert_err(
            &r,
            &[
                ("", "empty"),
                ("   \n ", "empty"),
                ("\"\"", "empty"),
                ("a photo of sks dog", "empty"),
                ("a photo of sks dog.", "empty"),
                ("A dog sitting on a sofa.", "missing_prefix"),
                ("In this photo, sks dog sits on a sofa.", "missing_prefix"),
                ("a photo of sks doggy on a sofa.", "missing_prefix"),
                ("a photo of a dog on a sofa.", "missing_prefix"),
                (
                    "- a photo of sks dog\n- a red ball\n- a sofa",
                    "not_plain_text",
                ),
                (
                    "a photo of sks dog on a sofa next to another sks dog.",
                    "token_count",
                ),
                ("a photo of sks dog on a sofa. sks is happy.", "token_count"),
                (
                    "a photo of sks dog on a sofa. One. Two. Three. Four.",
                    "too_many_sentences",
                ),
                (&long, "too_long"),
                (
                    "a photo of sks dog with brown fur sitting on a sofa.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog, fluffy and white, on a sofa.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog, a golden retriever, on a rug.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog, a brown and white puppy, on a rug.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog with white paws on a blue rug.",
                    "describes_subject",
                ),
                ("a photo of sks dog is black on a rug.", "describes_subject"),
                (
                    "a photo of sks dog on a red sofa. Its fur is golden.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog on a rug. The dog's coat is spotted.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog on a rug, it has shaggy fur.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog with a shaggy coat on a rug.",
                    "describes_subject",
                ),
                (
                    "a photo of sks dog on a rug. This dog is small.",
                    "describes_subject",
                ),
            ],
        );
    }

    #[test]
    fn describes_subject_names_the_word_and_phrase() {
        let r = dog(DescriptionCase::Sid);
        let p =
            validate_description("a photo of sks dog with brown fur on a sofa.", &r).unwrap_err();
        assert_eq!(
            p,
            DescriptionProblem::DescribesSubject {
                subject: "sks dog".into(),
                word: "brown".into(),
                phrase: "sks dog with brown".into(),
            }
        );
        assert!(p
            .to_string()
            .contains("must not describe the sks dog itself"));
    }

    #[test]
    fn class_names_case() {
        let r = dog(DescriptionCase::ClassNames);
        assert_ok(
            &r,
            &[(
                "a photo of sks dog next to a sofa and a lamp in a living room.",
                "a photo of sks dog next to a sofa and a lamp in a living room.",
            )],
        );
        assert_err(
            &r,
            &[
                (
                    "a photo of sks dog with white paws next to a sofa.",
                    "describes_subject",
                ),
                ("a photo of sks dog", "empty"),
                ("a sofa and a lamp.", "missing_prefix"),
            ],
        );
    }

    #[test]
    fn full_case_allows_describing_the_subject() {
        let r = dog(DescriptionCase::Full);
        let d = "a photo of sks dog with brown fur and white paws, fluffy and small, sitting on a red sofa.";
        assert_ok(&r, &[(d, d)]);
        assert_err(
            &r,
            &[
                (
                    "a photo of sks dog with brown fur. The sks dog is small.",
                    "token_count",
                ),
                ("A brown dog on a sofa.", "missing_prefix"),
            ],
        );
    }

    #[test]
    fn class_only_is_the_prefix_exactly() {
        let r = dog(DescriptionCase::ClassOnly);
        assert_ok(
            &r,
            &[
                ("a photo of sks dog", "a photo of sks dog"),
                ("A photo of sks dog.", "a photo of sks dog"),
                ("\"a photo of sks dog\"", "a photo of sks dog"),
                ("sks dog", "a photo of sks dog"),
            ],
        );
        assert_err(
            &r,
            &[
                ("", "empty"),
                ("a photo of sks dog on a sofa.", "not_prefix_only"),
                ("a photo of a dog", "missing_prefix"),
            ],
        );
    }

    #[test]
    fn style_mode() {
        let r = art(DescriptionCase::Sid);
        let d = "a painting in the style of sks art showing a harbour with three red fishing boats under a cloudy sky.";
        assert_ok(
            &r,
            &[
                (d, d),
                (
                    "A painting in the style of sks art of a woman with a blue umbrella in a field.",
                    "a painting in the style of sks art of a woman with a blue umbrella in a field.",
                ),
                ("sks art showing a bridge.", "a painting in the style of sks art showing a bridge."),
            ],
        );
        assert_err(
            &r,
            &[
                ("a painting in the style of sks art with bold brushstrokes of a harbour.", "describes_style"),
                ("a painting in the style of sks art depicting a harbour, in an impressionist style.", "describes_style"),
                ("a painting in the style of sks art, a watercolour of a bridge.", "describes_style"),
                ("a photo of sks art showing a bridge.", "missing_prefix"),
                ("a painting in the style of sks art", "empty"),
            ],
        );
        let names = art(DescriptionCase::ClassNames);
        assert_err(
            &names,
            &[(
                "a painting in the style of sks art of boats, in pastel colours.",
                "describes_style",
            )],
        );
        let full = art(DescriptionCase::Full);
        let f = "a painting in the style of sks art of a harbour, painted with thick impasto brushstrokes.";
        assert_ok(&full, &[(f, f)]);
        let only = art(DescriptionCase::ClassOnly);
        assert_ok(
            &only,
            &[(
                "A painting in the style of sks art.",
                "a painting in the style of sks art",
            )],
        );
    }

    #[test]
    fn multi_word_class_and_other_token() {
        let r = rules(DescriptionCase::Sid, Mode::Object, "ohwx", "teddy bear");
        assert_ok(
            &r,
            &[
                (
                    "a photo of ohwx teddy bear on a white shelf.",
                    "a photo of ohwx teddy bear on a white shelf.",
                ),
                (
                    "ohwx teddy bear on a white shelf.",
                    "a photo of ohwx teddy bear on a white shelf.",
                ),
            ],
        );
        assert_err(
            &r,
            &[
                (
                    "a photo of ohwx teddy bear with brown fur on a shelf.",
                    "describes_subject",
                ),
                ("a photo of ohwx bear on a shelf.", "missing_prefix"),
                ("a photo of sks teddy bear on a shelf.", "missing_prefix"),
                ("a photo of ohwx teddy bear. ohwx again.", "token_count"),
            ],
        );
    }

    #[test]
    fn limits_come_from_the_rules() {
        let mut r = dog(DescriptionCase::Sid);
        r.max_sentences = 1;
        assert_err(
            &r,
            &[(
                "a photo of sks dog on a rug. A lamp stands behind.",
                "too_many_sentences",
            )],
        );
        r.max_sentences = 4;
        r.max_chars = 30;
        assert_err(&r, &[("a photo of sks dog on a red rug.", "too_long")]);
        assert_eq!(
            DescriptionRules::new(
                DescriptionCase::Sid,
                Mode::Object,
                IdentifierToken::default(),
                SubjectClass::parse("dog").unwrap()
            )
            .max_chars,
            MAX_DESCRIPTION_CHARS
        );
    }

    #[test]
    fn descriptions_longer_than_the_text_encoder_reads_are_refused() {
        let rules = rules(DescriptionCase::Sid, Mode::Object, "sks", "dog");
        let fits = "a photo of sks dog sitting on a red sofa next to a window with white curtains";
        assert!(validate_description(fits, &rules).is_ok());
        // Two sentences of many short objects: under the character and sentence limits, over
        // 77 CLIP tokens.
        let long = format!(
            "a photo of sks dog sitting on a sofa beside {}. The wall behind has {}.",
            "a lamp, a cup, a book, a plant, a vase, a clock, a pen, a box, a hat, a bag, a fan",
            "a map, a mirror, a shelf, a frame, a poster, a calendar, a switch, a socket, a hook, \
             a rug, a chair, a desk, a radio"
        );
        match validate_description(&long, &rules) {
            Err(DescriptionProblem::TooManyTokens {
                tokens,
                max,
                cut,
                words,
            }) => {
                assert_eq!(max, 77);
                assert!(tokens > 77, "{tokens}");
                assert!(long.ends_with(&cut), "{cut:?} is the end of the text");
                assert!(words > 10 && words < long.split_whitespace().count());
            }
            other => panic!("expected too_many_tokens, got {other:?}"),
        }
    }

    #[test]
    fn every_code_is_listed_and_distinct() {
        let problems = [
            DescriptionProblem::Empty { prefix: "p".into() },
            DescriptionProblem::NotPlainText { items: 2 },
            DescriptionProblem::MissingPrefix {
                expected: "p".into(),
            },
            DescriptionProblem::NotPrefixOnly {
                expected: "p".into(),
            },
            DescriptionProblem::TooLong { chars: 2, max: 1 },
            DescriptionProblem::TooManySentences { count: 2, max: 1 },
            DescriptionProblem::TooManyTokens {
                tokens: 80,
                max: 77,
                cut: "x".into(),
                words: 40,
            },
            DescriptionProblem::TokenCount {
                token: "t".into(),
                class: "c".into(),
                found: 2,
            },
            DescriptionProblem::DescribesSubject {
                subject: "s".into(),
                word: "w".into(),
                phrase: "p".into(),
            },
            DescriptionProblem::DescribesStyle { word: "w".into() },
        ];
        let codes: Vec<_> = problems.iter().map(|p| p.code()).collect();
        assert_eq!(codes, DescriptionProblem::CODES.to_vec());
        let mut unique = codes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), codes.len());
        for p in &problems {
            assert!(!p.message().is_empty());
        }
    }

    #[test]
    fn rules_from_a_job_spec() {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "subject_class": "cat", "token": "zwx", "mode": "object",
            "descriptions": {"case": "class_names"}
        }))
        .unwrap();
        let r = DescriptionRules::for_spec(&spec);
        assert_eq!(r.prefix(), "a photo of zwx cat");
        assert_eq!(r.case, DescriptionCase::ClassNames);
        assert!(r.instruction().text.contains("\"a photo of zwx cat\""));
        assert_eq!(r.fixed_description(), None);
    }
}
