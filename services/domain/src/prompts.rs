//! The DreamBooth dataset's evaluation prompts: 25 for objects, 25 for live subjects (the
//! dataset's `prompts_and_classes.txt`; the SID paper evaluates on the same). A job without
//! prompts of its own is generated and evaluated on these, with its token and class.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::text::{IdentifierToken, SubjectClass};

/// Which of the dataset's two prompt lists fits a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    /// Things: backpacks, sneakers, toys, vases.
    Object,
    /// Animals: the prompts dress them up ("wearing a red hat", "in a chef outfit").
    Live,
}

/// Class words taken as live subjects when the spec does not say. The dataset's live subjects
/// are its cats and dogs; the other animals are here because "a sks horse in a police outfit"
/// is the question a user of that class would ask.
const LIVE_CLASSES: [&str; 15] = [
    "dog",
    "cat",
    "puppy",
    "kitten",
    "pet",
    "horse",
    "rabbit",
    "bunny",
    "bird",
    "parrot",
    "hamster",
    "guinea pig",
    "pig",
    "cow",
    "monkey",
];

impl SubjectKind {
    /// The kind the dataset would give this class: live for animals, else object.
    pub fn for_class(class: &SubjectClass) -> SubjectKind {
        let class = class.as_str();
        let last_word = class.rsplit(' ').next().unwrap_or(class);
        if LIVE_CLASSES.contains(&class) || LIVE_CLASSES.contains(&last_word) {
            SubjectKind::Live
        } else {
            SubjectKind::Object
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Object => "object",
            SubjectKind::Live => "live",
        }
    }
}

/// The 20 prompts both lists share, as `(before, after)` the "{token} {class}" pair.
const SHARED: [(&str, &str); 10] = [
    ("a", "in the jungle"),
    ("a", "in the snow"),
    ("a", "on the beach"),
    ("a", "on a cobblestone street"),
    ("a", "on top of pink fabric"),
    ("a", "on top of a wooden floor"),
    ("a", "with a city in the background"),
    ("a", "with a mountain in the background"),
    ("a", "with a blue house in the background"),
    ("a", "on top of a purple rug in a forest"),
];

const OBJECT_ONLY: [(&str, &str); 10] = [
    ("a", "with a wheat field in the background"),
    ("a", "with a tree and autumn leaves in the background"),
    ("a", "with the Eiffel Tower in the background"),
    ("a", "floating on top of water"),
    ("a", "floating in an ocean of milk"),
    ("a", "on top of green grass with sunflowers around it"),
    ("a", "on top of a mirror"),
    ("a", "on top of the sidewalk in a crowded street"),
    ("a", "on top of a dirt road"),
    ("a", "on top of a white rug"),
];

const LIVE_ONLY: [(&str, &str); 10] = [
    ("a", "wearing a red hat"),
    ("a", "wearing a santa hat"),
    ("a", "wearing a rainbow scarf"),
    ("a", "wearing a black top hat and a monocle"),
    ("a", "in a chef outfit"),
    ("a", "in a firefighter outfit"),
    ("a", "in a police outfit"),
    ("a", "wearing pink glasses"),
    ("a", "wearing a yellow shirt"),
    ("a", "in a purple wizard outfit"),
];

/// The property prompts that end both lists.
const PROPERTIES: [(&str, &str); 5] = [
    ("a red", ""),
    ("a purple", ""),
    ("a shiny", ""),
    ("a wet", ""),
    ("a cube shaped", ""),
];

/// The dataset's 25 prompts for this kind, with the job's token and class, in the dataset's
/// order.
pub fn dreambooth_prompts(
    kind: SubjectKind,
    token: &IdentifierToken,
    class: &SubjectClass,
) -> Vec<String> {
    let middle = match kind {
        SubjectKind::Object => OBJECT_ONLY,
        SubjectKind::Live => LIVE_ONLY,
    };
    SHARED
        .iter()
        .chain(middle.iter())
        .chain(PROPERTIES.iter())
        .map(|(before, after)| {
            let mut prompt = format!("{before} {token} {class}");
            if !after.is_empty() {
                prompt.push(' ');
                prompt.push_str(after);
            }
            prompt
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_dataset_list(text: &str, heading: &str) -> Vec<String> {
        let start = text.find(heading).expect("heading in the dataset file");
        text[start..]
            .lines()
            .skip_while(|l| !l.starts_with("prompt_list"))
            .skip(1)
            .take_while(|l| !l.starts_with(']'))
            .map(|l| {
                let quoted = l.trim().trim_start_matches('\'');
                let end = quoted.find('\'').unwrap();
                quoted[..end].replace("{0}", "sks").replace("{1}", "dog")
            })
            .collect()
    }

    /// The lists are the dataset's, word for word, when the file is beside the checkout.
    #[test]
    fn prompts_are_the_datasets() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/datasets/dreambooth/prompts_and_classes.txt"
        );
        let text =
            std::fs::read_to_string(path).expect("the DreamBooth dataset beside the checkout");
        let (token, class) = (
            IdentifierToken::default(),
            SubjectClass::parse("dog").unwrap(),
        );
        assert_eq!(
            dreambooth_prompts(SubjectKind::Object, &token, &class),
            parse_dataset_list(&text, "Object Prompts")
        );
        assert_eq!(
            dreambooth_prompts(SubjectKind::Live, &token, &class),
            parse_dataset_list(&text, "Live Subject Prompts")
        );
    }

    #[test]
    fn kinds_follow_the_class() {
        let kind = |c: &str| SubjectKind::for_class(&SubjectClass::parse(c).unwrap());
        assert_eq!(kind("dog"), SubjectKind::Live);
        assert_eq!(kind("tabby cat"), SubjectKind::Live);
        assert_eq!(kind("backpack"), SubjectKind::Object);
        // The dataset's plushies ("stuffed animal") are objects.
        assert_eq!(kind("stuffed animal"), SubjectKind::Object);
    }
}
