//! The artifacts of the describe stage, built from the final (approved, possibly edited) texts:
//!
//! * `descriptions.json`: one entry per image with its file name, text, case, model and the
//!   instruction the model was given;
//! * `captions.zip`: each image beside a same-named `.txt` holding its description
//!   (`00-photo.jpg` + `00-photo.txt`), the layout kohya sd-scripts, ai-toolkit and the
//!   diffusers training scripts read.

use std::io::{Cursor, Write};

use bytes::Bytes;
use serde::Serialize;
use sidbooth_core::{Description, JobImage};
use sidbooth_domain::DescriptionCase;
use zip::{write::SimpleFileOptions, CompressionMethod, ZipWriter};

use crate::{error::StageError, stage::StageContext};

pub const DESCRIPTIONS_JSON: &str = "descriptions.json";
pub const CAPTIONS_ZIP: &str = "captions.zip";

/// One image's entry in `descriptions.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct DescriptionEntry {
    pub idx: i32,
    /// The image's name inside `captions.zip` (the caption is the same name with `.txt`).
    pub file_name: String,
    /// The name the image was uploaded with.
    pub original_file_name: String,
    pub text: String,
    pub case: DescriptionCase,
    pub model: String,
    pub instruction: String,
    pub instruction_version: String,
    pub edited: bool,
}

/// The name an image gets in the export: its index and a file-system-safe version of its
/// uploaded name, so two uploads with the same name stay apart and sort in upload order.
pub fn export_name(image: &JobImage) -> String {
    let safe: String = image
        .file_name
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | ':' | '\0') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let safe = safe.trim_start_matches('.');
    let safe = if safe.is_empty() { "image" } else { safe };
    format!("{:02}-{safe}", image.idx)
}

/// `00-photo.jpg` -> `00-photo.txt`.
pub fn caption_name(export_name: &str) -> String {
    match export_name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => format!("{stem}.txt"),
        _ => format!("{export_name}.txt"),
    }
}

/// Pairs every image with its description; an image without one is a bug upstream.
pub fn entries(
    images: &[JobImage],
    descriptions: &[Description],
) -> Result<Vec<DescriptionEntry>, StageError> {
    images
        .iter()
        .map(|image| {
            let d = descriptions
                .iter()
                .find(|d| d.idx == image.idx)
                .ok_or_else(|| {
                    StageError::permanent(
                        "description_missing",
                        format!(
                            "image {} ({}) has no description",
                            image.idx, image.file_name
                        ),
                    )
                })?;
            if let Some(problem) = &d.problem {
                return Err(StageError::permanent(
                    "description_invalid",
                    format!(
                        "image {} ({}) still has a problem: {problem}",
                        image.idx, image.file_name
                    ),
                ));
            }
            Ok(DescriptionEntry {
                idx: image.idx,
                file_name: export_name(image),
                original_file_name: image.file_name.clone(),
                text: d.text.clone(),
                case: d.case,
                model: d.model.clone(),
                instruction: d.instruction.clone(),
                instruction_version: d.instruction_version.clone(),
                edited: d.edited,
            })
        })
        .collect()
}

pub fn descriptions_json(entries: &[DescriptionEntry]) -> Result<Vec<u8>, StageError> {
    serde_json::to_vec_pretty(entries)
        .map_err(|e| StageError::permanent("artifact_error", e.to_string()))
}

/// The zip of image/caption pairs. `photos` holds each entry's image bytes, in the same order.
pub fn captions_zip(entries: &[DescriptionEntry], photos: &[Bytes]) -> Result<Vec<u8>, StageError> {
    let err = |e: zip::result::ZipError| StageError::permanent("artifact_error", e.to_string());
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    // Photos are compressed already; captions are small text.
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let deflated = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (entry, photo) in entries.iter().zip(photos) {
        zip.start_file(entry.file_name.as_str(), stored)
            .map_err(err)?;
        zip.write_all(photo).map_err(|e| err(e.into()))?;
        zip.start_file(caption_name(&entry.file_name), deflated)
            .map_err(err)?;
        zip.write_all(entry.text.as_bytes())
            .map_err(|e| err(e.into()))?;
        zip.write_all(b"\n").map_err(|e| err(e.into()))?;
    }
    Ok(zip.finish().map_err(err)?.into_inner())
}

/// Builds and stores both artifacts from the descriptions as they stand.
#[tracing::instrument(skip_all, fields(job_id = %cx.lease.job_id))]
pub async fn write(cx: &StageContext<'_>) -> Result<(), StageError> {
    let images = cx.io.images().await?;
    let descriptions = cx.io.descriptions().await?;
    let entries = entries(&images, &descriptions)?;
    let mut photos = Vec::with_capacity(images.len());
    for image in &images {
        photos.push(cx.io.photo(image).await?);
    }
    let (json, zip) = tokio::task::spawn_blocking(move || {
        Ok::<_, StageError>((
            descriptions_json(&entries)?,
            captions_zip(&entries, &photos)?,
        ))
    })
    .await
    .map_err(|e| StageError::permanent("artifact_error", e.to_string()))??;
    cx.io
        .store(DESCRIPTIONS_JSON, "application/json", json)
        .await?;
    cx.io.store(CAPTIONS_ZIP, "application/zip", zip).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn image(idx: i32, name: &str) -> JobImage {
        JobImage {
            idx,
            file_name: name.into(),
            object_key: format!("k/{idx}"),
            content_type: "image/jpeg".into(),
            sha256: "00".into(),
            width: 1,
            height: 1,
            bytes: 1,
            mask_object_key: None,
        }
    }

    fn description(idx: i32, text: &str) -> Description {
        Description {
            idx,
            text: text.into(),
            case: DescriptionCase::Sid,
            model: "m".into(),
            instruction: "i".into(),
            instruction_version: "v".into(),
            problem: None,
            edited: idx == 1,
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn names_are_unique_safe_and_paired() {
        assert_eq!(export_name(&image(0, "photo.jpg")), "00-photo.jpg");
        assert_eq!(export_name(&image(3, "../x/y.png")), "03-_x_y.png");
        assert_eq!(caption_name("00-photo.jpg"), "00-photo.txt");
        assert_eq!(caption_name("01-noext"), "01-noext.txt");
        assert_eq!(caption_name("02-a.b.webp"), "02-a.b.txt");
    }

    #[test]
    fn zip_holds_image_caption_pairs() {
        let images = [image(0, "a.jpg"), image(1, "a.jpg")];
        let ds = [
            description(1, "a photo of sks dog two"),
            description(0, "a photo of sks dog one"),
        ];
        let entries = entries(&images, &ds).unwrap();
        assert_eq!(entries[0].text, "a photo of sks dog one");
        assert!(entries[1].edited);
        let bytes = captions_zip(
            &entries,
            &[Bytes::from_static(b"IMG0"), Bytes::from_static(b"IMG1")],
        )
        .unwrap();
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
        assert_eq!(zip.len(), 4);
        let mut read = |name: &str| {
            let mut s = String::new();
            zip.by_name(name).unwrap().read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read("00-a.jpg"), "IMG0");
        assert_eq!(read("01-a.txt"), "a photo of sks dog two\n");
        let json: Vec<DescriptionEntry> =
            serde_json::from_slice(&descriptions_json(&entries).unwrap()).unwrap();
        assert_eq!(json, entries);
    }

    #[test]
    fn missing_or_problem_descriptions_are_refused() {
        let images = [image(0, "a.jpg"), image(1, "b.jpg")];
        assert!(entries(&images, &[description(0, "x")]).is_err());
        let mut d = description(1, "x");
        d.problem = Some(serde_json::json!({"code": "empty"}));
        assert!(entries(&images, &[description(0, "x"), d]).is_err());
    }
}
