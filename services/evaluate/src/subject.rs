//! Subject masks made automatically, class-conditioned like the paper's Grounded-SAM: a box for
//! the subject, then SAM turns the box into a mask.
//!
//! The box comes from the vision-language model when there is one (the worker asks it during
//! describe). Without one, SAM's automatic mask proposals are ranked against each other by the
//! CLIP similarity of their subject segments to "a photo of a {class}", and the best one's box
//! prompts SAM again: a proposal is a region SAM finds coherent, the box prompt gives the one
//! whole object around it (a proposal is often just the dog's head).

use image::RgbImage;
use sidbooth_domain::report::MaskSource;

use crate::clip::ClipModel;
use crate::error::Result;
use crate::mask::{Mask, PixelBox};
use crate::measures::cosine;
use crate::sam::{ProposalSettings, Sam};
use crate::segments::subject_segment;

/// A subject mask and how it was made.
#[derive(Debug, Clone)]
pub struct SubjectMask {
    pub mask: Mask,
    pub source: MaskSource,
    /// The box SAM was prompted with.
    pub prompt_box: PixelBox,
    /// For ranked proposals: the winner's CLIP similarity to the class prompt.
    pub score: Option<f64>,
}

/// The text the proposals are ranked against.
pub fn class_prompt(class: &str) -> String {
    format!("a photo of a {class}")
}

/// SAM's mask for a box (from the vision-language model or the user).
pub fn segment_box(sam: &Sam, photo: &RgbImage, prompt_box: PixelBox) -> Result<SubjectMask> {
    Ok(SubjectMask {
        mask: sam.mask_for_box(photo, prompt_box)?,
        source: MaskSource::SamVlmBox,
        prompt_box,
        score: None,
    })
}

/// The index and score of the proposal whose subject segment CLIP finds most like the class
/// prompt; `None` without proposals.
pub fn rank_proposals(
    clip: &ClipModel,
    photo: &RgbImage,
    masks: &[&Mask],
    class: &str,
) -> Result<Option<(usize, f64)>> {
    let segments: Vec<(usize, RgbImage)> = masks
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((i, subject_segment(photo, m)?)))
        .collect();
    if segments.is_empty() {
        return Ok(None);
    }
    let images: Vec<RgbImage> = segments.iter().map(|(_, s)| s.clone()).collect();
    let embeddings = clip.image_embeddings(&images)?;
    let text = clip.text_embeddings(&[class_prompt(class).as_str()])?;
    let best = segments
        .iter()
        .zip(&embeddings)
        .map(|((i, _), e)| (*i, cosine(e, &text[0])))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    Ok(best)
}

/// The subject mask without a box from outside: ranked proposals, then SAM with the winner's
/// box. `None` when SAM proposes nothing.
pub fn segment_automatically(
    sam: &Sam,
    clip: &ClipModel,
    photo: &RgbImage,
    class: &str,
    settings: &ProposalSettings,
) -> Result<Option<SubjectMask>> {
    let proposals = sam.proposals(photo, settings)?;
    let masks: Vec<&Mask> = proposals.iter().map(|p| &p.mask).collect();
    let Some((best, score)) = rank_proposals(clip, photo, &masks, class)? else {
        return Ok(None);
    };
    let prompt_box = proposals[best].bbox;
    Ok(Some(SubjectMask {
        mask: sam.mask_for_box(photo, prompt_box)?,
        source: MaskSource::SamClipRanked,
        prompt_box,
        score: Some(score),
    }))
}
