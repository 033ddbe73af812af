//! The instructions sent to the vision-language model, one per (description case, mode).
//!
//! They follow the rules of the SID paper (see `shared/reference/sid-method.md`):
//! - every description starts with the fixed prefix of [`Mode::prefix`]
//!   ("a photo of sks dog" / "a painting in the style of sks art");
//! - `sid`: every other object and the background in detail (colour, material, pattern,
//!   position), never the subject's own appearance; transient states (pose, gaze, facial
//!   expression) may be named, because leaving out a strong expression entangles it with the
//!   identifier (paper, appendix D.2);
//! - `class_names`: only the class names of the other objects and of the background;
//! - `full`: everything in detail, the subject included;
//! - `class_only`: the prefix alone, no model needed.
//!
//! In style mode the "subject" is the painting style: the model describes what the painting
//! depicts and never the style itself (paper, appendix C.1), except in `full`.
//!
//! The texts also state the output rules that [`crate::validate`] checks (prefix, the
//! identifier used once, a few sentences of plain text), so a model that follows the
//! instruction passes validation.
//!
//! Whenever a text below changes, bump [`INSTRUCTION_VERSION`]: cached descriptions are keyed by
//! it, and each stored description records the version it was written with.

use sidbooth_domain::{DescriptionCase, IdentifierToken, Mode, SubjectClass};

/// Version of the instruction texts in this module. Part of every cache key.
pub const INSTRUCTION_VERSION: &str = "2026-12-01.1";

/// The most sentences an instruction asks for; the validator allows one more
/// (see [`crate::validate::DEFAULT_MAX_SENTENCES`]).
pub const ASKED_MAX_SENTENCES: usize = 3;

/// The most words an instruction asks for: English takes about 1.3 CLIP tokens a word, so 50
/// words stay inside the 75 tokens the text encoder reads between its start and end tokens.
pub const ASKED_MAX_WORDS: usize = 50;

/// An instruction text and the version of the texts it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub text: String,
    pub version: &'static str,
}

/// The description of the `class_only` case, which needs no model: the prefix alone.
/// `None` for the cases a model has to write.
pub fn fixed_description(
    case: DescriptionCase,
    mode: Mode,
    token: &IdentifierToken,
    class: &SubjectClass,
) -> Option<String> {
    (!case.needs_model()).then(|| mode.prefix(token, class))
}

/// The instruction for one description case and mode.
///
/// For `class_only` the text asks for the prefix alone; callers should not send it at all and
/// use [`fixed_description`] instead (the client does so).
pub fn instruction_for(
    case: DescriptionCase,
    mode: Mode,
    token: &IdentifierToken,
    class: &SubjectClass,
) -> Instruction {
    let prefix = mode.prefix(token, class);
    let subject = format!("{token} {class}");
    let text = match (mode, case) {
        (_, DescriptionCase::ClassOnly) => class_only(&prefix),
        (Mode::Object, DescriptionCase::Sid) => object_sid(&prefix, &subject, class),
        (Mode::Object, DescriptionCase::ClassNames) => object_class_names(&prefix, &subject, class),
        (Mode::Object, DescriptionCase::Full) => object_full(&prefix, &subject, class),
        (Mode::Style, DescriptionCase::Sid) => style_sid(&prefix, &subject),
        (Mode::Style, DescriptionCase::ClassNames) => style_class_names(&prefix, &subject),
        (Mode::Style, DescriptionCase::Full) => style_full(&prefix, &subject),
    };
    Instruction {
        text,
        version: INSTRUCTION_VERSION,
    }
}

fn class_only(prefix: &str) -> String {
    format!("Reply with exactly these words and nothing else: \"{prefix}\"")
}

fn output_rules(subject: &str) -> String {
    format!(
        "Use \"{subject}\" exactly once, in the opening words, and do not write \"{subject}\" or \
         the word \"{token}\" anywhere else; after the opening words, call it \"it\". Write \
         one sentence, or at most {n}, and at most {words} words in all, in plain English \
         text: no quotation marks, no lists, no headings, no line breaks, no markdown, and \
         nothing before or after the description.",
        token = subject.split(' ').next().unwrap_or(subject),
        n = ASKED_MAX_SENTENCES,
        words = ASKED_MAX_WORDS,
    )
}

fn object_sid(prefix: &str, subject: &str, class: &SubjectClass) -> String {
    format!(
        "You write a training caption for this photo. The photo shows one particular {class}, \
         which the caption calls \"{subject}\". \
         Begin the caption with exactly these words: \"{prefix}\". \
         Then describe in detail everything in the photo other than the {subject}: every other \
         object, animal, person and surface, and the background, each with its colour, \
         material, pattern and position relative to the {subject}. Objects that touch or hold \
         the {subject}, or that it wears, count as other objects and are described too. \
         Never describe the appearance of the {subject} itself: not its colour, markings, \
         breed, fur, coat, hair, texture, material, pattern, shape or size, and do not refer to \
         it again with \"it\", \"its\" or \"the {class}\" followed by how it looks. \
         You may state what is transient about it: its pose (for example sitting, lying, \
         running), where it looks, and its facial expression (for example mouth open, tongue \
         out, eyes closed). {rules}",
        rules = output_rules(subject),
    )
}

fn object_class_names(prefix: &str, subject: &str, class: &SubjectClass) -> String {
    format!(
        "You write a training caption for this photo. The photo shows one particular {class}, \
         which the caption calls \"{subject}\". \
         Begin the caption with exactly these words: \"{prefix}\". \
         Then name the other objects, animals and people in the photo and the kind of \
         background or place, by their class names only (for example \"next to a sofa and a \
         lamp in a living room\"): no colours, materials, patterns or other details of them. \
         Never describe the appearance of the {subject} itself: not its colour, markings, \
         breed, fur, coat, hair, texture, material, pattern, shape or size. You may state its \
         pose (for example sitting or lying). {rules}",
        rules = output_rules(subject),
    )
}

fn object_full(prefix: &str, subject: &str, class: &SubjectClass) -> String {
    format!(
        "You write a training caption for this photo. The photo shows one particular {class}, \
         which the caption calls \"{subject}\". \
         Begin the caption with exactly these words: \"{prefix}\". \
         Then describe the {subject} in detail (its colours, markings, material, texture, shape, \
         pose and expression), and describe in detail every other object, animal, person and \
         surface in the photo and the background, each with its colour, material, pattern and \
         position. Refer to the {subject} after the opening words only as \"it\" or \"its\". \
         {rules}",
        rules = output_rules(subject),
    )
}

const STYLE_WORDS_EXAMPLES: &str = "brushwork, strokes, palette, lighting style, medium, \
technique, texture of the paint, art movement or artist";

fn style_sid(prefix: &str, subject: &str) -> String {
    format!(
        "You write a training caption for this image, a painting or drawing in one particular \
         style, which the caption calls \"{subject}\". \
         Begin the caption with exactly these words: \"{prefix}\". \
         Then describe in detail what the image depicts: every object, animal, person and \
         building, and the scene or background, each with its colour, shape and position. \
         Never describe the style of the image itself: not its {STYLE_WORDS_EXAMPLES}, and do \
         not use the word \"style\" again. {rules}",
        rules = output_rules(subject),
    )
}

fn style_class_names(prefix: &str, subject: &str) -> String {
    format!(
        "You write a training caption for this image, a painting or drawing in one particular \
         style, which the caption calls \"{subject}\". \
         Begin the caption with exactly these words: \"{prefix}\". \
         Then name what the image depicts, the objects, animals, people and buildings and the \
         kind of scene, by their class names only (for example \"of a harbour with boats and a \
         lighthouse\"): no colours, materials or other details. Never describe the style of \
         the image itself: not its {STYLE_WORDS_EXAMPLES}, and do not use the word \"style\" \
         again. {rules}",
        rules = output_rules(subject),
    )
}

fn style_full(prefix: &str, subject: &str) -> String {
    format!(
        "You write a training caption for this image, a painting or drawing in one particular \
         style, which the caption calls \"{subject}\". \
         Begin the caption with exactly these words: \"{prefix}\". \
         Then describe in detail what the image depicts, every object, animal, person and \
         building and the scene, each with its colour, shape and position, and also describe \
         the style itself: {STYLE_WORDS_EXAMPLES}. {rules}",
        rules = output_rules(subject),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> IdentifierToken {
        IdentifierToken::parse("sks").unwrap()
    }
    fn dog() -> SubjectClass {
        SubjectClass::parse("dog").unwrap()
    }
    fn art() -> SubjectClass {
        SubjectClass::parse("art").unwrap()
    }

    #[test]
    fn every_model_instruction_quotes_the_exact_prefix() {
        for mode in [Mode::Object, Mode::Style] {
            let class = if mode == Mode::Object { dog() } else { art() };
            for case in DescriptionCase::ALL {
                let i = instruction_for(case, mode, &tok(), &class);
                let prefix = mode.prefix(&tok(), &class);
                assert!(
                    i.text.contains(&format!("\"{prefix}\"")),
                    "{case:?} {mode:?}: {}",
                    i.text
                );
                assert_eq!(i.version, INSTRUCTION_VERSION);
            }
        }
    }

    #[test]
    fn object_sid_asks_for_details_of_others_and_forbids_the_subject() {
        let t = instruction_for(DescriptionCase::Sid, Mode::Object, &tok(), &dog()).text;
        assert!(t.contains("a photo of sks dog"));
        for needed in [
            "other than the sks dog",
            "background",
            "colour, material, pattern and position",
            "Never describe the appearance of the sks dog",
            "breed, fur, coat",
            "facial expression",
            "pose",
            "no lists",
            "at most 3",
        ] {
            assert!(t.contains(needed), "missing {needed:?} in {t}");
        }
    }

    #[test]
    fn class_names_forbids_details_of_others_and_of_the_subject() {
        let t = instruction_for(DescriptionCase::ClassNames, Mode::Object, &tok(), &dog()).text;
        assert!(t.contains("class names only"));
        assert!(t.contains("no colours, materials, patterns"));
        assert!(t.contains("Never describe the appearance of the sks dog"));
        assert!(!t.contains("in detail"));
    }

    #[test]
    fn full_describes_the_subject_too() {
        let t = instruction_for(DescriptionCase::Full, Mode::Object, &tok(), &dog()).text;
        assert!(t.contains("describe the sks dog in detail"));
        assert!(!t.contains("Never describe"));
    }

    #[test]
    fn style_mode_describes_content_never_the_style() {
        let prefix = "a painting in the style of sks art";
        let sid = instruction_for(DescriptionCase::Sid, Mode::Style, &tok(), &art()).text;
        assert!(sid.contains(prefix));
        assert!(sid.contains("what the image depicts"));
        assert!(sid.contains("Never describe the style"));
        let names = instruction_for(DescriptionCase::ClassNames, Mode::Style, &tok(), &art()).text;
        assert!(names.contains("class names only"));
        assert!(names.contains("Never describe the style"));
        let full = instruction_for(DescriptionCase::Full, Mode::Style, &tok(), &art()).text;
        assert!(full.contains("also describe the style itself"));
        assert!(!full.contains("Never describe"));
    }

    #[test]
    fn class_only_needs_no_model_and_is_the_prefix() {
        assert_eq!(
            fixed_description(DescriptionCase::ClassOnly, Mode::Object, &tok(), &dog()).as_deref(),
            Some("a photo of sks dog")
        );
        assert_eq!(
            fixed_description(DescriptionCase::ClassOnly, Mode::Style, &tok(), &art()).as_deref(),
            Some("a painting in the style of sks art")
        );
        for case in [
            DescriptionCase::Sid,
            DescriptionCase::ClassNames,
            DescriptionCase::Full,
        ] {
            assert_eq!(fixed_description(case, Mode::Object, &tok(), &dog()), None);
        }
    }

    #[test]
    fn token_and_class_are_substituted() {
        let token = IdentifierToken::parse("ohwx").unwrap();
        let class = SubjectClass::parse("teddy bear").unwrap();
        let t = instruction_for(DescriptionCase::Sid, Mode::Object, &token, &class).text;
        assert!(t.contains("\"a photo of ohwx teddy bear\""));
        assert!(t.contains("the word \"ohwx\""));
        assert!(!t.contains("sks"));
    }
}
