//! The measures, from embeddings (see `sidbooth_domain::report` for the definitions).
//!
//! Everything here is arithmetic on features that [`crate::evaluator`] extracted: which images
//! were embedded how is decided there, what is compared with what is decided here. One measure
//! is one function over embeddings and masks, named as in report.json.

use sidbooth_domain::report::{MeasureValues, Pairs};

use crate::mask::Mask;

/// What the measures need of one reference photo.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReferenceFeatures {
    /// CLIP image embedding of the photo.
    pub clip: Vec<f32>,
    /// DINO embedding of the photo, when a DINO model was given.
    pub dino: Option<Vec<f32>>,
    /// CLIP embedding of the subject segment, when the photo has a mask.
    pub subject: Option<Vec<f32>>,
    /// CLIP embedding of the non-subject segment, when the photo has a mask.
    pub non_subject: Option<Vec<f32>>,
}

/// What the measures need of one generated image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageFeatures {
    pub clip: Vec<f32>,
    pub dino: Option<Vec<f32>>,
    /// [`attention_on_subject`] of the image, when it has an attention map and a subject mask.
    pub attention_on_subject: Option<f64>,
}

/// Cosine similarity (the embeddings are unit vectors already; dividing by the norms keeps the
/// function right for any input).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "embeddings of different sizes");
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// The prompt text-alignment compares with: the identifier token removed (as a whole word),
/// whitespace collapsed. "a sks dog on the beach" -> "a dog on the beach".
pub fn without_identifier(prompt: &str, token: &str) -> String {
    prompt
        .split_whitespace()
        .filter(|w| *w != token)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Share of an attention map's mass that falls inside `mask`, the map upsampled to the mask's
/// size bilinearly (half-pixel centres, edges clamped) as the overlay images show it. `None`
/// when the map has no mass.
pub fn attention_on_subject(map: &[f32], (h, w): (usize, usize), mask: &Mask) -> Option<f64> {
    assert_eq!(map.len(), h * w, "attention map of the wrong size");
    let (mw, mh) = mask.dimensions();
    let axis = |out: u32, inp: usize| -> Vec<(usize, usize, f64)> {
        (0..out)
            .map(|o| {
                let src = ((f64::from(o) + 0.5) * inp as f64 / f64::from(out) - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                (i0, i1, src - i0 as f64)
            })
            .collect()
    };
    let (xs, ys) = (axis(mw, w), axis(mh, h));
    let (mut inside, mut total) = (0.0f64, 0.0f64);
    for (y, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (x, &(x0, x1, fx)) in xs.iter().enumerate() {
            let at = |r: usize, c: usize| f64::from(map[r * w + c]).max(0.0);
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            let v = top * (1.0 - fy) + bottom * fy;
            total += v;
            if mask.get(x as u32, y as u32) {
                inside += v;
            }
        }
    }
    (total > 0.0).then(|| inside / total)
}

/// Every measure of one prompt: its pair matrices, per-image values and means.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptScores {
    pub pairs: Pairs,
    /// Per generated image: its column of each matrix averaged over the references, and its
    /// own values.
    pub images: Vec<MeasureValues>,
    /// The mean of each measure's values over this prompt.
    pub means: MeasureValues,
}

fn matrix(
    refs: &[ReferenceFeatures],
    images: &[ImageFeatures],
    pick_ref: impl Fn(&ReferenceFeatures) -> Option<&Vec<f32>>,
    pick_image: impl Fn(&ImageFeatures) -> Option<&Vec<f32>>,
    value: impl Fn(f64) -> f64,
) -> Option<Vec<Vec<f64>>> {
    refs.iter()
        .map(|r| {
            let r = pick_ref(r)?;
            images
                .iter()
                .map(|i| Some(value(cosine(r, pick_image(i)?))))
                .collect()
        })
        .collect()
}

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn column_mean(m: &Option<Vec<Vec<f64>>>, j: usize) -> Option<f64> {
    mean(m.as_ref()?.iter().map(|row| row[j]))
}

/// Scores one prompt's generated images against the references. `reference_names` and
/// `image_names` label the matrices' rows and columns; `text` is the CLIP text embedding of the
/// prompt without the identifier. A matrix is `None` when any row or column lacks what it
/// needs (no DINO, a reference without a mask): a measure over some references only would not
/// compare with the same measure elsewhere.
pub fn score_prompt(
    reference_names: &[String],
    refs: &[ReferenceFeatures],
    image_names: &[String],
    images: &[ImageFeatures],
    text: &[f32],
) -> PromptScores {
    let clip_i = matrix(refs, images, |r| Some(&r.clip), |i| Some(&i.clip), |c| c);
    let dino = matrix(
        refs,
        images,
        |r| r.dino.as_ref(),
        |i| i.dino.as_ref(),
        |c| c,
    );
    let subject = matrix(
        refs,
        images,
        |r| r.subject.as_ref(),
        |i| Some(&i.clip),
        |c| c,
    );
    let non_subject = matrix(
        refs,
        images,
        |r| r.non_subject.as_ref(),
        |i| Some(&i.clip),
        |c| 1.0 - c,
    );
    let text_alignment: Vec<f64> = images.iter().map(|i| cosine(&i.clip, text)).collect();
    let attention: Vec<Option<f64>> = images.iter().map(|i| i.attention_on_subject).collect();

    let per_image: Vec<MeasureValues> = (0..images.len())
        .map(|j| MeasureValues {
            clip_i: column_mean(&clip_i, j),
            dino: column_mean(&dino, j),
            subject_alignment: column_mean(&subject, j),
            non_subject_disentanglement: column_mean(&non_subject, j),
            text_alignment: Some(text_alignment[j]),
            attention_on_subject: attention[j],
        })
        .collect();
    let all = |m: &Option<Vec<Vec<f64>>>| mean(m.iter().flatten().flatten().copied());
    let means = MeasureValues {
        clip_i: all(&clip_i),
        dino: all(&dino),
        subject_alignment: all(&subject),
        non_subject_disentanglement: all(&non_subject),
        text_alignment: mean(text_alignment.iter().copied()),
        attention_on_subject: mean(attention.iter().flatten().copied()),
    };
    PromptScores {
        pairs: Pairs {
            references: reference_names.to_vec(),
            images: image_names.to_vec(),
            clip_i,
            dino,
            subject_alignment: subject,
            non_subject_disentanglement: non_subject,
            text_alignment: Some(text_alignment),
            attention_on_subject: attention.iter().any(Option::is_some).then_some(attention),
        },
        images: per_image,
        means,
    }
}

/// Each measure over several prompts: the mean of all its values (pairs of every prompt for the
/// matrices, images of every prompt for the per-image measures).
pub fn overall(prompts: &[PromptScores]) -> MeasureValues {
    let pairs = |pick: fn(&Pairs) -> &Option<Vec<Vec<f64>>>| {
        let per_prompt: Option<Vec<&Vec<Vec<f64>>>> =
            prompts.iter().map(|p| pick(&p.pairs).as_ref()).collect();
        mean(per_prompt?.into_iter().flatten().flatten().copied())
    };
    MeasureValues {
        clip_i: pairs(|p| &p.clip_i),
        dino: pairs(|p| &p.dino),
        subject_alignment: pairs(|p| &p.subject_alignment),
        non_subject_disentanglement: pairs(|p| &p.non_subject_disentanglement),
        text_alignment: mean(
            prompts
                .iter()
                .flat_map(|p| p.pairs.text_alignment.iter().flatten().copied()),
        ),
        attention_on_subject: mean(prompts.iter().flat_map(|p| {
            p.pairs
                .attention_on_subject
                .iter()
                .flatten()
                .flatten()
                .copied()
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn cosine_and_identifier() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-12);
        assert_eq!(
            without_identifier("a  sks dog on the beach", "sks"),
            "a dog on the beach"
        );
        assert_eq!(without_identifier("a sksy dog", "sks"), "a sksy dog");
    }

    #[test]
    fn matrices_rows_are_references_columns_images() {
        let r = |c: &[f32], s: Option<&[f32]>| ReferenceFeatures {
            clip: unit(c),
            dino: None,
            subject: s.map(unit),
            non_subject: s.map(|_| unit(&[0.0, 1.0])),
        };
        let i = |c: &[f32], a: Option<f64>| ImageFeatures {
            clip: unit(c),
            dino: None,
            attention_on_subject: a,
        };
        let refs = [
            r(&[1.0, 0.0], Some(&[1.0, 0.0])),
            r(&[0.0, 1.0], Some(&[1.0, 1.0])),
        ];
        let images = [
            i(&[1.0, 0.0], Some(0.5)),
            i(&[1.0, 1.0], None),
            i(&[0.0, 1.0], Some(1.0)),
        ];
        let names = |n: usize, p: &str| (0..n).map(|k| format!("{p}{k}")).collect::<Vec<_>>();
        let s = score_prompt(
            &names(2, "r"),
            &refs,
            &names(3, "y"),
            &images,
            &unit(&[1.0, 0.0]),
        );
        let clip_i = s.pairs.clip_i.as_ref().unwrap();
        assert_eq!(clip_i.len(), 2);
        assert_eq!(clip_i[0].len(), 3);
        assert!((clip_i[0][0] - 1.0).abs() < 1e-6 && clip_i[1][0].abs() < 1e-6);
        assert!((clip_i[1][1] - 0.5f64.sqrt()).abs() < 1e-6);
        let nsd = s.pairs.non_subject_disentanglement.as_ref().unwrap();
        assert!((nsd[0][2] - 0.0).abs() < 1e-6, "identical non-subject -> 0");
        assert!(
            (nsd[0][0] - 1.0).abs() < 1e-6,
            "orthogonal non-subject -> 1"
        );
        assert!(s.pairs.dino.is_none() && s.means.dino.is_none());
        let ta = s.pairs.text_alignment.as_ref().unwrap();
        assert!((ta[0] - 1.0).abs() < 1e-6 && ta[2].abs() < 1e-6);
        assert_eq!(s.means.attention_on_subject, Some(0.75));
        assert!((s.images[0].clip_i.unwrap() - 0.5).abs() < 1e-6);
        // Overall over one prompt is that prompt's means.
        assert_eq!(overall(std::slice::from_ref(&s)), s.means);
    }

    #[test]
    fn a_reference_without_mask_leaves_the_mask_measures_out() {
        let refs = [
            ReferenceFeatures {
                clip: vec![1.0, 0.0],
                dino: None,
                subject: Some(vec![1.0, 0.0]),
                non_subject: Some(vec![1.0, 0.0]),
            },
            ReferenceFeatures {
                clip: vec![1.0, 0.0],
                dino: None,
                subject: None,
                non_subject: None,
            },
        ];
        let images = [ImageFeatures {
            clip: vec![1.0, 0.0],
            dino: None,
            attention_on_subject: None,
        }];
        let s = score_prompt(
            &["a".into(), "b".into()],
            &refs,
            &["y".into()],
            &images,
            &[1.0, 0.0],
        );
        assert!(s.pairs.subject_alignment.is_none());
        assert!(s.means.non_subject_disentanglement.is_none());
        assert!(s.means.clip_i.is_some());
        assert!(s.pairs.attention_on_subject.is_none());
    }

    #[test]
    fn overall_is_the_mean_of_all_values() {
        let one = |c: f32| {
            let refs = [ReferenceFeatures {
                clip: vec![1.0, 0.0],
                dino: None,
                subject: None,
                non_subject: None,
            }];
            let images = [ImageFeatures {
                clip: vec![c, (1.0 - c * c).sqrt()],
                dino: None,
                attention_on_subject: None,
            }];
            score_prompt(&["r".into()], &refs, &["y".into()], &images, &[1.0, 0.0])
        };
        let o = overall(&[one(1.0), one(0.0), one(0.5)]);
        assert!((o.clip_i.unwrap() - 0.5).abs() < 1e-6);
    }

    #[test]
    fn attention_share_counts_mass_inside_the_mask() {
        // All mass in the left column of a 2x2 map; the mask is the left half of a 4x4 image.
        let map = [1.0, 0.0, 1.0, 0.0];
        let left = Mask::from_bools(4, 4, |x, _| x < 2);
        let share = attention_on_subject(&map, (2, 2), &left).unwrap();
        // Bilinear spreads a quarter of the column's weight into the right half.
        assert!(share > 0.7 && share < 0.9, "{share}");
        let everything = Mask::from_bools(4, 4, |_, _| true);
        assert!((attention_on_subject(&map, (2, 2), &everything).unwrap() - 1.0).abs() < 1e-12);
        let flat = [1.0; 4];
        assert!((attention_on_subject(&flat, (2, 2), &left).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(attention_on_subject(&[0.0; 4], (2, 2), &left), None);
    }
}
