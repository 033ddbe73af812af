//! The subject's bounding box, asked of the vision-language model during describe: the box
//! prompt that SAM turns into the subject mask (the paper segments with Grounded-SAM, a
//! detector's box for the class name followed by SAM; a model that already looks at the photo
//! is a detector that knows which of two dogs is "the" dog).
//!
//! The model answers with JSON, `{"box": [x0, y0, x1, y1]}` in fractions of the image's width
//! and height, or `{"box": null}` when it sees no such subject. [`parse_subject_box`] is strict
//! about what it accepts and says why it refused, so the client can ask again.

use serde::{Deserialize, Serialize};
use sidbooth_domain::SubjectClass;

/// Every box instruction starts with these words (the fake VLM recognises box requests by them).
pub const BOX_INSTRUCTION_START: &str = "Locate the main";

/// A box in fractions of the image's width and height, `0 <= x0 < x1 <= 1`, same for y.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormalizedBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl NormalizedBox {
    /// The box in pixels of an image of this size.
    pub fn to_pixels(&self, width: u32, height: u32) -> [f64; 4] {
        let (w, h) = (f64::from(width), f64::from(height));
        [self.x0 * w, self.y0 * h, self.x1 * w, self.y1 * h]
    }
}

/// The instruction for one photo of a subject of this class.
pub fn box_instruction(class: &SubjectClass) -> String {
    format!(
        "{BOX_INSTRUCTION_START} {class} in this photo and give its bounding box. Reply with \
         JSON only, no other text: {{\"box\": [x0, y0, x1, y1]}}, where x0, y0 is the top-left \
         and x1, y1 the bottom-right corner of the smallest box around the whole {class}, each \
         a fraction of the image's width or height between 0 and 1 (for example \
         {{\"box\": [0.21, 0.30, 0.64, 0.97]}}). If there are several, box the one the photo \
         is about. If there is no {class} in the photo, reply {{\"box\": null}}."
    )
}

/// Why an answer was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BoxProblem {
    #[error("the answer is not JSON with a \"box\" field: {0}")]
    NotJson(String),
    #[error("\"box\" must be null or a list of four numbers [x0, y0, x1, y1]")]
    NotFourNumbers,
    #[error(
        "the box coordinates must be fractions of the image size between 0 and 1, with x0 < x1 \
         and y0 < y1; got {0:?}"
    )]
    OutOfRange([f64; 4]),
    #[error("the box {0:?} is too small to hold the subject")]
    TooSmall([f64; 4]),
}

impl BoxProblem {
    pub fn code(&self) -> &'static str {
        match self {
            BoxProblem::NotJson(_) => "box_not_json",
            BoxProblem::NotFourNumbers => "box_not_four_numbers",
            BoxProblem::OutOfRange(_) => "box_out_of_range",
            BoxProblem::TooSmall(_) => "box_too_small",
        }
    }
}

/// Coordinates a little outside [0, 1] are rounding of a box that touches the border.
const SLACK: f64 = 0.02;
/// A box must cover at least this share of each side.
const MIN_SIDE: f64 = 0.01;

/// `Ok(None)`: the model saw no subject. A code fence around the JSON is accepted.
pub fn parse_subject_box(reply: &str) -> Result<Option<NormalizedBox>, BoxProblem> {
    let text = reply.trim();
    let text = text
        .strip_prefix("```json")
        .or_else(|| text.strip_prefix("```"))
        .map(|t| t.trim_end().trim_end_matches("```"))
        .unwrap_or(text)
        .trim();
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| BoxProblem::NotJson(e.to_string()))?;
    let field = value
        .get("box")
        .ok_or_else(|| BoxProblem::NotJson("no \"box\" field".into()))?;
    if field.is_null() {
        return Ok(None);
    }
    let numbers: Vec<f64> = field
        .as_array()
        .filter(|a| a.len() == 4)
        .and_then(|a| a.iter().map(serde_json::Value::as_f64).collect())
        .ok_or(BoxProblem::NotFourNumbers)?;
    let raw = [numbers[0], numbers[1], numbers[2], numbers[3]];
    let in_range = |v: f64| v.is_finite() && (-SLACK..=1.0 + SLACK).contains(&v);
    if !raw.iter().all(|&v| in_range(v)) || raw[0] >= raw[2] || raw[1] >= raw[3] {
        return Err(BoxProblem::OutOfRange(raw));
    }
    let c = |v: f64| v.clamp(0.0, 1.0);
    let b = NormalizedBox {
        x0: c(raw[0]),
        y0: c(raw[1]),
        x1: c(raw[2]),
        y1: c(raw[3]),
    };
    if b.x1 - b.x0 < MIN_SIDE || b.y1 - b.y0 < MIN_SIDE {
        return Err(BoxProblem::TooSmall(raw));
    }
    Ok(Some(b))
}

/// The follow-up message after a refused answer.
pub fn box_correction(problem: &BoxProblem) -> String {
    format!(
        "That answer cannot be used: {problem}. Reply again with JSON only: \
         {{\"box\": [x0, y0, x1, y1]}} in fractions of the image size, or {{\"box\": null}}."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_boxes_fences_and_null() {
        let b = parse_subject_box(r#"{"box": [0.1, 0.2, 0.5, 0.9]}"#)
            .unwrap()
            .unwrap();
        assert_eq!((b.x0, b.y0, b.x1, b.y1), (0.1, 0.2, 0.5, 0.9));
        assert_eq!(b.to_pixels(200, 100), [20.0, 20.0, 100.0, 90.0]);
        let fenced = "```json\n{\"box\": [0, 0, 1.01, 1]}\n```";
        assert_eq!(parse_subject_box(fenced).unwrap().unwrap().x1, 1.0);
        assert_eq!(parse_subject_box(r#"{"box": null}"#).unwrap(), None);
    }

    #[test]
    fn refuses_with_a_reason() {
        let code = |s: &str| parse_subject_box(s).unwrap_err().code();
        assert_eq!(code("the dog is in the middle"), "box_not_json");
        assert_eq!(code(r#"{"bbox": [0, 0, 1, 1]}"#), "box_not_json");
        assert_eq!(code(r#"{"box": [0, 0, 1]}"#), "box_not_four_numbers");
        assert_eq!(code(r#"{"box": ["a", 0, 1, 1]}"#), "box_not_four_numbers");
        assert_eq!(code(r#"{"box": [10, 20, 300, 400]}"#), "box_out_of_range");
        assert_eq!(code(r#"{"box": [0.5, 0.2, 0.4, 0.9]}"#), "box_out_of_range");
        assert_eq!(code(r#"{"box": [0.5, 0.2, 0.505, 0.9]}"#), "box_too_small");
    }

    #[test]
    fn instruction_names_the_class_and_the_format() {
        let text = box_instruction(&SubjectClass::parse("teddy bear").unwrap());
        assert!(text.starts_with(BOX_INSTRUCTION_START));
        assert!(text.contains("teddy bear"));
        assert!(text.contains("{\"box\": null}"));
    }
}
