//! Newtypes for the two words every description is built around: the subject class ("dog") and
//! the identifier token ("sks"). Both end up inside CLIP prompts and inside file names of the
//! caption export, so they must survive both: printable ASCII letters, digits, spaces and a few
//! joiners, no path separators, no brackets that prompt syntaxes give meaning to.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest subject class accepted. CLIP sees 77 tokens; a class name that eats a third of
/// them leaves no room for the description.
pub const MAX_CLASS_CHARS: usize = 40;
/// Identifier tokens are rare single words ("sks", "ohwx"); anything longer is a mistake.
pub const MAX_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} contains {found:?}; allowed are {allowed}")]
    BadCharacter {
        field: &'static str,
        found: char,
        allowed: &'static str,
    },
}

/// The subject's class noun, e.g. "dog", "backpack", "teddy bear". Lower-cased and with inner
/// whitespace collapsed, so "Teddy  Bear" and "teddy bear" are the same class.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct SubjectClass(String);

impl SubjectClass {
    const ALLOWED: &'static str = "ASCII letters, digits, spaces, '-' and '''";

    pub fn parse(raw: &str) -> Result<Self, TextError> {
        const FIELD: &str = "subject_class";
        let collapsed = raw.split_whitespace().collect::<Vec<_>>().join(" ");
        if collapsed.is_empty() {
            return Err(TextError::Empty { field: FIELD });
        }
        if collapsed.chars().count() > MAX_CLASS_CHARS {
            return Err(TextError::TooLong {
                field: FIELD,
                max: MAX_CLASS_CHARS,
            });
        }
        if let Some(found) = collapsed
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '\'')))
        {
            return Err(TextError::BadCharacter {
                field: FIELD,
                found,
                allowed: Self::ALLOWED,
            });
        }
        Ok(Self(collapsed.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubjectClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SubjectClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// The identifier that stands for the subject in every prompt ("[v]" in the paper). One word of
/// lower-case ASCII letters and digits, so the CLIP tokenizer keeps it together and it can be
/// found again in a description with a plain word match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct IdentifierToken(String);

impl IdentifierToken {
    pub const DEFAULT: &'static str = "sks";
    const ALLOWED: &'static str = "lower-case ASCII letters and digits";

    pub fn parse(raw: &str) -> Result<Self, TextError> {
        const FIELD: &str = "token";
        if raw.is_empty() {
            return Err(TextError::Empty { field: FIELD });
        }
        if raw.chars().count() > MAX_TOKEN_CHARS {
            return Err(TextError::TooLong {
                field: FIELD,
                max: MAX_TOKEN_CHARS,
            });
        }
        if let Some(found) = raw
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            return Err(TextError::BadCharacter {
                field: FIELD,
                found,
                allowed: Self::ALLOWED,
            });
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for IdentifierToken {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for IdentifierToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for IdentifierToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_is_normalised() {
        let c = SubjectClass::parse("  Teddy   Bear ").unwrap();
        assert_eq!(c.as_str(), "teddy bear");
    }

    #[test]
    fn class_rejects_empty_long_and_odd_characters() {
        assert_eq!(
            SubjectClass::parse("   "),
            Err(TextError::Empty {
                field: "subject_class"
            })
        );
        assert!(matches!(
            SubjectClass::parse(&"a".repeat(41)),
            Err(TextError::TooLong { .. })
        ));
        for bad in ["dog/cat", "dog\u{0}", "dög", "(dog)", "dog.txt", "do\u{7}g"] {
            assert!(
                matches!(
                    SubjectClass::parse(bad),
                    Err(TextError::BadCharacter { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn token_rules() {
        assert_eq!(IdentifierToken::default().as_str(), "sks");
        assert!(IdentifierToken::parse("ohwx9").is_ok());
        for bad in ["", "Sks", "s k", "[v]", "abcdefghijklmnopq"] {
            assert!(IdentifierToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<SubjectClass>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("subject_class"));
    }
}
