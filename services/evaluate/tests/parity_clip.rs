//! CLIP and DINO embeddings against transformers, on the tiny random-weight models and photos
//! of `fixtures/` (written by `scripts/parity/make_eval_fixtures.py`; the photos are PNGs
//! because the `image` crate's JPEG decoder does not give Pillow's bytes).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::json;
use sidbooth_evaluate::clip::ClipModel;
use sidbooth_evaluate::dino::DinoModel;
use sidbooth_evaluate::preprocess::ImageProcessor;
use sidbooth_evaluate::EvalError;

/// Through the whole pipeline from the photo (preprocessing included).
const FROM_PHOTO: f32 = 1e-3;
/// From the same pixel values.
const FROM_PIXELS: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

fn reference() -> Reference {
    let path = fixtures().join("eval-reference.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    Reference {
        tensors: candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
        metadata: header.metadata().clone().unwrap_or_default(),
    }
}

impl Reference {
    fn tensor(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    fn list(&self, key: &str) -> Vec<String> {
        serde_json::from_str(&self.metadata[key]).unwrap()
    }

    fn photos(&self) -> Vec<RgbImage> {
        self.list("photos")
            .iter()
            .map(|n| png(&fixtures().join("photos").join(n)))
            .collect()
    }
}

fn png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

fn clip() -> ClipModel {
    ClipModel::load(&fixtures().join("tiny-clip"), &Device::Cpu).unwrap()
}

fn dino() -> DinoModel {
    DinoModel::load(&fixtures().join("tiny-dino"), &Device::Cpu).unwrap()
}

#[test]
fn clip_pixel_values_match_pil() {
    let r = reference();
    let ours = clip()
        .processor()
        .preprocess_batch(&r.photos(), &Device::Cpu)
        .unwrap();
    let err = max_abs(&ours, r.tensor("clip_pixel_values"));
    eprintln!("CLIP pixel values: max abs error {err:e}");
    // one grey level is 1/255/std = 0.015 here: anything above f32 rounding is a wrong pixel
    assert!(err <= 1e-6, "{err}");
}

#[test]
fn dino_pixel_values_match_pil() {
    let r = reference();
    let ours = dino()
        .processor()
        .preprocess_batch(&r.photos(), &Device::Cpu)
        .unwrap();
    let err = max_abs(&ours, r.tensor("dino_pixel_values"));
    eprintln!("DINO pixel values: max abs error {err:e}");
    assert!(err <= 1e-6, "{err}");
}

#[test]
fn openai_preprocessing_at_224_matches_pil_pixel_for_pixel() {
    let r = reference();
    let name = &r.list("photos")[0];
    let p = ImageProcessor::from_json(
        &json!({
            "feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224,
            "resample": 3, "do_center_crop": true
        }),
        Path::new("openai"),
    )
    .unwrap();
    let ours = p.resize_and_crop(&r.photos()[0]);
    let theirs = png(&fixtures().join("photos").join(format!("clip224-{name}")));
    assert_eq!(ours.dimensions(), (224, 224));
    let differing = ours
        .pixels()
        .zip(theirs.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "{differing} pixels differ");
}

#[test]
fn clip_image_embeddings_match_transformers() {
    let r = reference();
    let m = clip();
    let from_photos = m.image_embeddings(&r.photos()).unwrap();
    let err = max_abs(&tensor(&from_photos), r.tensor("clip_image_embeds"));
    eprintln!("CLIP image embeddings from photos: max abs error {err:e}");
    assert!(err <= FROM_PHOTO, "{err}");
    let from_pixels = m
        .image_embeddings_preprocessed(r.tensor("clip_pixel_values"))
        .unwrap();
    let err = max_abs(&from_pixels, r.tensor("clip_image_embeds"));
    eprintln!("CLIP image embeddings from pixel values: max abs error {err:e}");
    assert!(err <= FROM_PIXELS, "{err}");
}

#[test]
fn clip_text_embeddings_match_transformers() {
    let r = reference();
    let prompts = r.list("prompts");
    assert!(prompts.iter().any(|p| p.split_whitespace().count() > 77));
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ours = clip().text_embeddings(&refs).unwrap();
    let err = max_abs(&tensor(&ours), r.tensor("clip_text_embeds"));
    eprintln!("CLIP text embeddings: max abs error {err:e}");
    assert!(err <= FROM_PIXELS, "{err}");
    // one at a time (no padding) gives the same as the padded batch
    let alone = clip().text_embeddings(&refs[..1]).unwrap();
    let err = max_abs(
        &tensor(&alone),
        &r.tensor("clip_text_embeds").narrow(0, 0, 1).unwrap(),
    );
    assert!(err <= FROM_PIXELS, "{err}");
}

#[test]
fn dino_embeddings_match_transformers() {
    let r = reference();
    let m = dino();
    let from_photos = m.image_embeddings(&r.photos()).unwrap();
    let err = max_abs(&tensor(&from_photos), r.tensor("dino_image_embeds"));
    eprintln!("DINO embeddings from photos: max abs error {err:e}");
    assert!(err <= FROM_PHOTO, "{err}");
    let from_pixels = m
        .image_embeddings_preprocessed(r.tensor("dino_pixel_values"))
        .unwrap();
    let err = max_abs(&from_pixels, r.tensor("dino_image_embeds"));
    eprintln!("DINO embeddings from pixel values: max abs error {err:e}");
    assert!(err <= FROM_PIXELS, "{err}");
}

/// A copy of a fixture model directory whose weights went through `edit`.
fn edited_copy(model: &str, edit: impl Fn(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let from = fixtures().join(model);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let weights = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    dir
}

fn assert_missing(result: Result<(), EvalError>, tensor: &str) {
    match result {
        Err(EvalError::MissingTensor { name, path }) => {
            assert_eq!(name, tensor);
            assert!(path.ends_with("model.safetensors"), "{}", path.display());
        }
        Err(other) => panic!("expected a missing {tensor}, got {other}"),
        Ok(()) => panic!("loaded without {tensor}"),
    }
}

#[test]
fn a_missing_tensor_is_named() {
    for name in [
        "vision_model.post_layernorm.weight",
        "text_model.encoder.layers.1.mlp.fc2.bias",
        "text_model.embeddings.token_embedding.weight",
        "visual_projection.weight",
    ] {
        let dir = edited_copy("tiny-clip", |t| {
            t.remove(name).unwrap();
        });
        assert_missing(ClipModel::load(dir.path(), &Device::Cpu).map(drop), name);
    }
    let name = "encoder.layer.1.attention.output.dense.bias";
    let dir = edited_copy("tiny-dino", |t| {
        t.remove(name).unwrap();
    });
    assert_missing(DinoModel::load(dir.path(), &Device::Cpu).map(drop), name);
}

#[test]
fn a_missing_file_is_named() {
    for file in [
        "preprocessor_config.json",
        "model.safetensors",
        "merges.txt",
        "config.json",
    ] {
        let dir = edited_copy("tiny-clip", |_| {});
        std::fs::remove_file(dir.path().join(file)).unwrap();
        match ClipModel::load(dir.path(), &Device::Cpu) {
            Err(EvalError::Io { path, .. }) => assert!(path.ends_with(file), "{}", path.display()),
            Err(other) => panic!("expected a missing {file}, got {other}"),
            Ok(_) => panic!("loaded without {file}"),
        }
    }
}

#[test]
fn dino_weights_with_the_vit_prefix_load_the_same() {
    let dir = edited_copy("tiny-dino", |t| {
        *t = t.drain().map(|(k, v)| (format!("vit.{k}"), v)).collect();
    });
    let r = reference();
    let plain = dino().image_embeddings(&r.photos()).unwrap();
    let prefixed = DinoModel::load(dir.path(), &Device::Cpu)
        .unwrap()
        .image_embeddings(&r.photos())
        .unwrap();
    assert_eq!(plain, prefixed);
}

#[test]
fn tiny_directories_round_trip() {
    let r = reference();
    let photos = r.photos();
    let dir = tempfile::tempdir().unwrap();
    ClipModel::write_tiny_dir(7, &dir.path().join("clip")).unwrap();
    DinoModel::write_tiny_dir(7, &dir.path().join("dino")).unwrap();

    let built = ClipModel::tiny(7, &Device::Cpu).unwrap();
    let loaded = ClipModel::load(&dir.path().join("clip"), &Device::Cpu).unwrap();
    assert_eq!(built.config(), loaded.config());
    assert_eq!(built.processor(), loaded.processor());
    assert_eq!(
        built.image_embeddings(&photos).unwrap(),
        loaded.image_embeddings(&photos).unwrap()
    );
    let texts = ["a sks dog on the beach", "a photo of a cat"];
    assert_eq!(
        built.text_embeddings(&texts).unwrap(),
        loaded.text_embeddings(&texts).unwrap()
    );
    // another seed is another model
    let other = ClipModel::tiny(8, &Device::Cpu).unwrap();
    assert_ne!(
        other.image_embeddings(&photos).unwrap(),
        loaded.image_embeddings(&photos).unwrap()
    );

    let built = DinoModel::tiny(7, &Device::Cpu).unwrap();
    let loaded = DinoModel::load(&dir.path().join("dino"), &Device::Cpu).unwrap();
    assert_eq!(built.config(), loaded.config());
    assert_eq!(
        built.image_embeddings(&photos).unwrap(),
        loaded.image_embeddings(&photos).unwrap()
    );
}
