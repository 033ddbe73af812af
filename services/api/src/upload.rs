//! Reading and checking the multipart body of `POST /v1/jobs`.
//!
//! [`read`] streams the parts with a per-file limit (the whole-body limit is the route's
//! `DefaultBodyLimit`). [`check`] then validates everything before anything is stored: the spec,
//! the image count, the manual descriptions and each image (format sniffed from its bytes,
//! dimensions read from the header before decoding, decoding under limits, EXIF orientation
//! applied). It is CPU work; run it on a blocking thread.

use std::io::Cursor;

use axum::extract::multipart::{Multipart, MultipartError};
use bytes::{Bytes, BytesMut};
use image::{
    codecs::{jpeg::JpegEncoder, png::PngEncoder, webp::WebPEncoder},
    DynamicImage, ImageDecoder, ImageFormat, ImageReader,
};
use sha2::{Digest, Sha256};
use sidbooth_describe::{validate_description, DescriptionRules};
use sidbooth_domain::{DescriptionSource, IdentifierToken, JobSpec, SubjectClass, MAX_IMAGES};
use sidbooth_imaging::Mask;

use crate::error::{ApiError, FieldError};

/// The largest accepted `spec` part. A spec with seven manual texts of 1,000 characters fits
/// many times over.
pub const MAX_SPEC_BYTES: u64 = 256 * 1024;

/// Limits for one upload.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_file_bytes: u64,
    pub max_request_bytes: u64,
    pub max_pixels: u64,
}

/// The parts as received.
#[derive(Debug, Default)]
pub struct RawUpload {
    pub spec: Option<Bytes>,
    pub images: Vec<RawImage>,
    /// Optional subject masks, one PNG per photo with the photo's file stem.
    pub masks: Vec<RawImage>,
}

#[derive(Debug)]
pub struct RawImage {
    pub declared_name: Option<String>,
    pub bytes: Bytes,
}

/// A checked upload, ready to store.
#[derive(Debug)]
pub struct Upload {
    pub spec: JobSpec,
    pub images: Vec<CheckedImage>,
    /// Hash of the spec part and every image's name and bytes: tells a retried request from a
    /// different one under the same Idempotency-Key.
    pub request_hash: Vec<u8>,
}

#[derive(Debug)]
pub struct CheckedImage {
    /// Sanitised file name with the extension of the sniffed format.
    pub file_name: String,
    /// What is stored: the original bytes, or the re-encoded image when EXIF orientation had to
    /// be applied.
    pub body: Bytes,
    pub format: ImageFormat,
    pub content_type: &'static str,
    pub sha256: String,
    /// Dimensions after orientation.
    pub width: u32,
    pub height: u32,
    /// The subject mask uploaded for this photo.
    pub mask: Option<CheckedMask>,
}

/// A checked subject mask: stored as a binary greyscale PNG (255 = subject).
#[derive(Debug)]
pub struct CheckedMask {
    pub body: Bytes,
    pub coverage: f32,
}

/// A mask's width/height ratio may differ from its photo's by this much (a mask drawn at
/// another resolution rounds its sides); more means it was made for another photo.
const MASK_ASPECT_TOLERANCE: f64 = 0.02;

fn part_name(idx: usize, declared: Option<&str>) -> String {
    match declared {
        Some(name) => format!("images[{idx}] ({name:?})"),
        None => format!("images[{idx}]"),
    }
}

fn multipart_error(e: MultipartError, limits: &UploadLimits) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::RequestTooLarge {
            max: limits.max_request_bytes,
        }
    } else {
        ApiError::InvalidRequest(format!("malformed multipart body: {}", e.body_text()))
    }
}

/// Reads the parts, refusing a part over its limit or an eighth image as soon as it shows up.
pub async fn read(mut multipart: Multipart, limits: &UploadLimits) -> Result<RawUpload, ApiError> {
    let mut upload = RawUpload::default();
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limits))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        let (part, max) = match name.as_str() {
            "spec" if upload.spec.is_some() => {
                return Err(ApiError::InvalidRequest("more than one `spec` part".into()))
            }
            "spec" => ("the spec part".to_owned(), MAX_SPEC_BYTES),
            "images" if upload.images.len() == MAX_IMAGES => {
                return Err(ApiError::TooManyImages { max: MAX_IMAGES })
            }
            "images" => (
                part_name(upload.images.len(), field.file_name()),
                limits.max_file_bytes,
            ),
            "masks" if upload.masks.len() == MAX_IMAGES => {
                return Err(ApiError::InvalidMask(FieldError {
                    pointer: format!("masks[{MAX_IMAGES}]"),
                    code: "mask_count".into(),
                    message: format!("at most {MAX_IMAGES} masks, one per photo"),
                }))
            }
            "masks" => (
                format!("masks[{}]", upload.masks.len()),
                limits.max_file_bytes,
            ),
            other => {
                return Err(ApiError::InvalidRequest(format!(
                    "unexpected part {other:?}; send one `spec` part, 1 to {MAX_IMAGES} \
                     `images` parts and optionally one `masks` part per image"
                )))
            }
        };
        let declared_name = field.file_name().map(str::to_owned);
        let mut bytes = BytesMut::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| multipart_error(e, limits))?
        {
            if (bytes.len() + chunk.len()) as u64 > max {
                return Err(if name == "spec" {
                    ApiError::InvalidSpec(format!("the spec part is larger than {max} bytes"))
                } else {
                    ApiError::FileTooLarge { part, max }
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let raw = RawImage {
            declared_name,
            bytes: bytes.freeze(),
        };
        match name.as_str() {
            "spec" => upload.spec = Some(raw.bytes),
            "images" => upload.images.push(raw),
            _ => upload.masks.push(raw),
        }
    }
    Ok(upload)
}

/// Validates everything; nothing has been stored yet.
pub fn check(raw: RawUpload, limits: &UploadLimits) -> Result<Upload, ApiError> {
    let spec_bytes = raw
        .spec
        .ok_or_else(|| ApiError::InvalidSpec("the request has no `spec` part".into()))?;
    let mut spec = parse_spec(&spec_bytes)?;
    if raw.images.is_empty() {
        return Err(ApiError::NoImages { max: MAX_IMAGES });
    }
    spec.validate(raw.images.len())?;
    check_manual_texts(&mut spec)?;

    let request_hash = request_hash(&spec_bytes, raw.images.iter().chain(&raw.masks));
    let mut masks = pair_masks(&raw.images, raw.masks)?;
    let mut images = Vec::with_capacity(raw.images.len());
    for (idx, image) in raw.images.into_iter().enumerate() {
        let part = part_name(idx, image.declared_name.as_deref());
        let mut checked = check_image(image.bytes, &part, limits.max_pixels)?;
        checked.file_name = unique_name(
            &images,
            sanitise_file_name(image.declared_name.as_deref(), idx, &checked),
            idx,
        );
        if let Some((mask_idx, mask)) = masks[idx].take() {
            checked.mask = Some(check_mask(
                &mask.bytes,
                &format!("masks[{mask_idx}]"),
                (checked.width, checked.height),
                limits.max_pixels,
            )?);
        }
        images.push(checked);
    }
    Ok(Upload {
        spec,
        images,
        request_hash,
    })
}

/// Strict parse; class and token errors get their own problem types.
fn parse_spec(bytes: &[u8]) -> Result<JobSpec, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::InvalidSpec(format!("the spec is not valid JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::InvalidSpec("the spec must be a JSON object".into()))?;
    if let Some(serde_json::Value::String(class)) = object.get("subject_class") {
        SubjectClass::parse(class)?;
    }
    if let Some(serde_json::Value::String(token)) = object.get("token") {
        IdentifierToken::parse(token)?;
    }
    serde_json::from_value(value).map_err(|e| ApiError::InvalidSpec(e.to_string()))
}

/// Manual texts go through the same validator as VLM output; the stored spec keeps the repaired
/// texts.
fn check_manual_texts(spec: &mut JobSpec) -> Result<(), ApiError> {
    if spec.descriptions.source != DescriptionSource::Manual {
        return Ok(());
    }
    let rules = DescriptionRules::for_spec(spec);
    let Some(texts) = spec.descriptions.texts.as_mut() else {
        return Ok(());
    };
    let mut errors = Vec::new();
    for (idx, text) in texts.iter_mut().enumerate() {
        match validate_description(text, &rules) {
            Ok(repaired) => *text = repaired,
            Err(problem) => errors.push(FieldError {
                pointer: format!("/descriptions/texts/{idx}"),
                code: problem.code().to_owned(),
                message: problem.message(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidDescriptions(errors))
    }
}

fn file_stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.rsplit_once('.').map_or(base, |(stem, _)| stem)
}

/// Pairs each mask with the photo of the same file stem (`00.jpg` with `00.png`): either no
/// masks, or exactly one per photo. Returns, per photo, the mask's part index and the mask.
fn pair_masks(
    images: &[RawImage],
    masks: Vec<RawImage>,
) -> Result<Vec<Option<(usize, RawImage)>>, ApiError> {
    let mut paired: Vec<Option<(usize, RawImage)>> = images.iter().map(|_| None).collect();
    if masks.is_empty() {
        return Ok(paired);
    }
    let invalid = |pointer: String, code: &str, message: String| {
        ApiError::InvalidMask(FieldError {
            pointer,
            code: code.into(),
            message,
        })
    };
    if masks.len() != images.len() {
        return Err(invalid(
            "masks".into(),
            "mask_count",
            format!(
                "{} masks for {} photos; send one mask per photo or none",
                masks.len(),
                images.len()
            ),
        ));
    }
    let stems: Vec<Option<&str>> = images
        .iter()
        .map(|i| i.declared_name.as_deref().map(file_stem))
        .collect();
    for (mask_idx, mask) in masks.into_iter().enumerate() {
        let pointer = format!("masks[{mask_idx}]");
        let Some(stem) = mask.declared_name.as_deref().map(file_stem) else {
            return Err(invalid(
                pointer,
                "mask_unpaired",
                "a mask part needs a file name with its photo's stem (00.png for 00.jpg)".into(),
            ));
        };
        let Some(photo) = stems.iter().position(|s| *s == Some(stem)) else {
            return Err(invalid(
                pointer,
                "mask_unpaired",
                format!("no photo has the file stem {stem:?} of this mask"),
            ));
        };
        if paired[photo].is_some() {
            return Err(invalid(
                pointer,
                "mask_unpaired",
                format!("two masks for the photo with the stem {stem:?}"),
            ));
        }
        paired[photo] = Some((mask_idx, mask));
    }
    Ok(paired)
}

/// Checks a mask like a photo (PNG only, size by its header before decoding) and against its
/// photo (same shape); stores it binarised.
pub fn check_mask(
    bytes: &[u8],
    part: &str,
    (photo_w, photo_h): (u32, u32),
    max_pixels: u64,
) -> Result<CheckedMask, ApiError> {
    let invalid = |code: &str, message: String| {
        ApiError::InvalidMask(FieldError {
            pointer: part.to_owned(),
            code: code.into(),
            message,
        })
    };
    if image::guess_format(bytes).ok() != Some(ImageFormat::Png) {
        return Err(invalid(
            "mask_not_png",
            "a mask must be a PNG (white = subject, black = the rest)".into(),
        ));
    }
    let reader = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Png);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| invalid("mask_unreadable", format!("the mask cannot be read: {e}")))?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(invalid(
            "mask_too_large",
            format!("the mask is {w}x{h} pixels; at most {max_pixels} pixels are accepted"),
        ));
    }
    let aspect = |w: u32, h: u32| f64::from(w) / f64::from(h.max(1));
    let (mask_aspect, photo_aspect) = (aspect(w, h), aspect(photo_w, photo_h));
    if (mask_aspect / photo_aspect - 1.0).abs() > MASK_ASPECT_TOLERANCE {
        return Err(invalid(
            "mask_size_mismatch",
            format!(
                "the mask is {w}x{h} but its photo is {photo_w}x{photo_h}: a mask must have \
                 its photo's shape"
            ),
        ));
    }
    let mask = Mask::from_png(bytes).map_err(|e| invalid(e.code, e.message))?;
    Ok(CheckedMask {
        coverage: mask.coverage() as f32,
        body: Bytes::from(mask.to_png()),
    })
}

fn request_hash<'a>(spec: &[u8], images: impl Iterator<Item = &'a RawImage>) -> Vec<u8> {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(spec);
    for image in images {
        field(
            image
                .declared_name
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
        );
        field(&image.bytes);
    }
    hasher.finalize().to_vec()
}

fn content_type(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "image/jpeg",
        ImageFormat::Png => "image/png",
        _ => "image/webp",
    }
}

fn extension(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "jpg",
        ImageFormat::Png => "png",
        _ => "webp",
    }
}

/// Sniffs, checks dimensions from the header, decodes under limits and applies orientation.
pub fn check_image(bytes: Bytes, part: &str, max_pixels: u64) -> Result<CheckedImage, ApiError> {
    let unsupported = || ApiError::UnsupportedImageType {
        part: part.to_owned(),
    };
    let corrupt = |reason: String| ApiError::CorruptImage {
        part: part.to_owned(),
        reason,
    };
    let format = image::guess_format(&bytes).map_err(|_| unsupported())?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
    ) {
        return Err(unsupported());
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(&bytes) {
        return Err(corrupt(
            "the JPEG data ends before its end-of-image marker".into(),
        ));
    }

    let mut reader = ImageReader::with_format(Cursor::new(&bytes[..]), format);
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(|e| corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(corrupt("the image has no pixels".into()));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ApiError::ImageTooLarge {
            part: part.to_owned(),
            width,
            height,
            max_mp: max_pixels as f64 / 1e6,
        });
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // The decoded image at 16 bits per channel with alpha, plus the decoder's own buffers.
    limits.max_alloc = Some(max_pixels * 8 * 2);
    decoder
        .set_limits(limits)
        .map_err(|e| corrupt(e.to_string()))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut decoded = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(e.to_string()))?;

    let body = if orientation == image::metadata::Orientation::NoTransforms {
        bytes
    } else {
        decoded.apply_orientation(orientation);
        encode(&decoded, format).map_err(|e| ApiError::Internal(format!("re-encoding: {e}")))?
    };
    Ok(CheckedImage {
        file_name: String::new(),
        mask: None,
        sha256: hex::encode(Sha256::digest(&body)),
        format,
        content_type: content_type(format),
        width: decoded.width(),
        height: decoded.height(),
        body,
    })
}

/// A JPEG whose entropy-coded data is cut off has no end-of-image marker after its last
/// start-of-scan; the decoder would otherwise fill the missing rows with grey.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_sos, last_eoi), (Some(sos), Some(eoi)) if eoi > sos)
}

fn encode(image: &DynamicImage, format: ImageFormat) -> image::ImageResult<Bytes> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Jpeg => {
            let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
            rgb.write_with_encoder(JpegEncoder::new_with_quality(&mut out, 92))?
        }
        ImageFormat::Png => image.write_with_encoder(PngEncoder::new(&mut out))?,
        _ => {
            let rgba = DynamicImage::ImageRgba8(image.to_rgba8());
            rgba.write_with_encoder(WebPEncoder::new_lossless(&mut out))?
        }
    }
    Ok(Bytes::from(out))
}

/// Longest stem kept of an uploaded file's name. The name ends the photo's storage key
/// (`tenants/<uuid>/jobs/<uuid>/inputs/NN-<name>`, 97 bytes before it), and S3-protocol servers
/// that keep objects as files limit what a key may be: s3s-fs names each object's metadata file
/// after base64 of the whole key, inside the 255-byte file-name limit, which keys longer than
/// about 160 bytes pass.
const MAX_STEM_CHARS: usize = 40;

/// Keeps a safe base name (ASCII letters, digits, `.`, `-`, `_`, at most [`MAX_STEM_CHARS`] of
/// them), with the extension of the real format; falls back to `image-{idx}`.
fn sanitise_file_name(declared: Option<&str>, idx: usize, image: &CheckedImage) -> String {
    let ext = extension(image.format);
    let base = declared
        .and_then(|name| name.rsplit(['/', '\\']).next())
        .unwrap_or_default();
    let stem = match base.rsplit_once('.') {
        Some((stem, _)) => stem,
        None => base,
    };
    let mut clean = String::new();
    for c in stem.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
            c
        } else {
            '_'
        };
        if !(c == '_' && clean.ends_with('_')) {
            clean.push(c);
        }
    }
    let clean: String = clean
        .trim_matches(|c| c == '.' || c == '_')
        .chars()
        .take(MAX_STEM_CHARS)
        .collect();
    if clean.is_empty() {
        format!("image-{idx}.{ext}")
    } else {
        format!("{clean}.{ext}")
    }
}

fn unique_name(earlier: &[CheckedImage], name: String, idx: usize) -> String {
    if earlier.iter().all(|image| image.file_name != name) {
        return name;
    }
    match name.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem}-{idx}.{ext}"),
        None => format!("{name}-{idx}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(format: ImageFormat) -> CheckedImage {
        CheckedImage {
            file_name: String::new(),
            body: Bytes::new(),
            format,
            content_type: content_type(format),
            sha256: String::new(),
            width: 1,
            height: 1,
            mask: None,
        }
    }

    #[test]
    fn file_names_are_sanitised() {
        let jpeg = checked(ImageFormat::Jpeg);
        assert_eq!(
            sanitise_file_name(Some("../../etc/passwd"), 0, &jpeg),
            "passwd.jpg"
        );
        assert_eq!(
            sanitise_file_name(Some("C:\\photos\\My Dog.PNG"), 1, &jpeg),
            "My_Dog.jpg"
        );
        assert_eq!(sanitise_file_name(Some("..."), 2, &jpeg), "image-2.jpg");
        assert_eq!(
            sanitise_file_name(None, 3, &checked(ImageFormat::WebP)),
            "image-3.webp"
        );
        assert_eq!(
            sanitise_file_name(Some("hund größe.jpg"), 4, &jpeg),
            "hund_gr_e.jpg"
        );
    }

    #[test]
    fn repeated_names_get_their_index() {
        let mut first = checked(ImageFormat::Jpeg);
        first.file_name = "a.jpg".into();
        assert_eq!(unique_name(&[first], "a.jpg".into(), 1), "a-1.jpg");
    }

    #[test]
    fn masks_pair_by_file_stem() {
        let raw = |name: Option<&str>| RawImage {
            declared_name: name.map(str::to_owned),
            bytes: Bytes::new(),
        };
        let photos = [raw(Some("a.jpg")), raw(Some("dir/b.jpg"))];
        let paired = pair_masks(&photos, vec![raw(Some("b.png")), raw(Some("a.png"))]).unwrap();
        assert_eq!(paired[0].as_ref().unwrap().0, 1);
        assert_eq!(paired[1].as_ref().unwrap().0, 0);
        assert!(pair_masks(&photos, vec![])
            .unwrap()
            .iter()
            .all(Option::is_none));
        let code = |masks| match pair_masks(&photos, masks) {
            Err(ApiError::InvalidMask(e)) => e.code,
            other => panic!("expected a mask error, got {other:?}"),
        };
        assert_eq!(code(vec![raw(Some("a.png"))]), "mask_count");
        assert_eq!(
            code(vec![raw(Some("a.png")), raw(Some("c.png"))]),
            "mask_unpaired"
        );
        assert_eq!(
            code(vec![raw(Some("a.png")), raw(Some("a.png"))]),
            "mask_unpaired"
        );
        assert_eq!(code(vec![raw(Some("a.png")), raw(None)]), "mask_unpaired");
    }

    #[test]
    fn masks_are_checked_against_their_photo() {
        let mask = Mask::from_bools(40, 30, |x, _| x < 10).to_png();
        let checked = check_mask(&mask, "masks[0]", (80, 60), 1_000_000).unwrap();
        assert!((checked.coverage - 0.25).abs() < 1e-6);
        let code = |bytes: &[u8], photo| match check_mask(bytes, "masks[0]", photo, 1_000_000) {
            Err(ApiError::InvalidMask(e)) => e.code,
            other => panic!("expected a mask error, got {other:?}"),
        };
        assert_eq!(code(&mask, (60, 60)), "mask_size_mismatch");
        assert_eq!(code(b"\xff\xd8\xff not a png", (80, 60)), "mask_not_png");
        let empty = Mask::from_bools(40, 30, |_, _| false).to_png();
        assert_eq!(code(&empty, (80, 60)), "mask_empty");
        let big = Mask::from_bools(2000, 1500, |x, _| x < 10).to_png();
        assert_eq!(
            match check_mask(&big, "masks[0]", (2000, 1500), 1_000_000) {
                Err(ApiError::InvalidMask(e)) => e.code,
                other => panic!("{other:?}"),
            },
            "mask_too_large"
        );
    }

    #[test]
    fn truncated_jpeg_is_detected() {
        assert!(jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9
        ]));
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
    }

    #[test]
    fn request_hash_covers_names_and_bytes() {
        let image = |name: &str, bytes: &'static [u8]| RawImage {
            declared_name: Some(name.into()),
            bytes: Bytes::from_static(bytes),
        };
        let hash = |spec: &[u8], parts: &[RawImage]| request_hash(spec, parts.iter());
        let a = hash(b"{}", &[image("a.jpg", b"1")]);
        assert_eq!(a, hash(b"{}", &[image("a.jpg", b"1")]));
        assert_ne!(a, hash(b"{}", &[image("b.jpg", b"1")]));
        assert_ne!(a, hash(b"{}", &[image("a.jpg", b"2")]));
        assert_ne!(a, hash(b"{ }", &[image("a.jpg", b"1")]));
        assert_ne!(
            a,
            hash(b"{}", &[image("a.jpg", b"1"), image("a.png", b"m")])
        );
    }
}
