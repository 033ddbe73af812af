//! The researcher commands `sidbooth train` and `sidbooth generate`, run as the real binary on
//! the built-in tiny model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sidbooth");

fn sidbooth(args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("runs the sidbooth binary")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// Fails with a non-zero exit and `needle` in stderr.
#[track_caller]
fn fails_with(o: Output, needle: &str) {
    assert!(!o.status.success(), "expected a failure: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(needle),
        "stderr lacks {needle:?}: {}",
        text(&o)
    );
    assert!(!err.contains("panicked"), "{}", text(&o));
}

/// A folder of small photos of different sizes (so resizing and cropping run).
fn photos(dir: &Path) -> PathBuf {
    let p = dir.join("photos");
    std::fs::create_dir_all(&p).unwrap();
    let sizes = [(40u32, 32u32), (32, 32), (36, 48)];
    for (i, (w, h)) in sizes.into_iter().enumerate() {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let k = i as u32 * 70;
            image::Rgb([
                ((x * 7 + k) % 256) as u8,
                ((y * 5 + 2 * k) % 256) as u8,
                ((x * y + k) % 256) as u8,
            ])
        });
        img.save(p.join(format!("{i:02}.png"))).unwrap();
    }
    p
}

fn png_text(path: &Path) -> HashMap<String, String> {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = dec.read_info().unwrap();
    reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect()
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

/// PNG files of a folder, sorted, without the attention heatmaps.
fn images(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "png")
                && !p.to_string_lossy().contains("-attention-")
        })
        .collect();
    v.sort();
    v
}

/// The JSON header of a safetensors file: tensor entries and `__metadata__`.
fn safetensors_header(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    match serde_json::from_slice(&b[8..8 + n]).unwrap() {
        serde_json::Value::Object(m) => m,
        v => panic!("header {v}"),
    }
}

/// Raw bytes of every tensor of a safetensors file, by name.
fn safetensors_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let data = &b[8 + n..];
    safetensors_header(path)
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (s, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k, data[s..e].to_vec())
        })
        .collect()
}

#[test]
fn train_writes_a_lora_that_generate_loads() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    photos(dir);
    std::fs::write(
        dir.join("captions.txt"),
        "a photo of sks dog on a red floor\na photo of sks dog\na photo of sks dog by a wall\n",
    )
    .unwrap();
    let o = ok(sidbooth(
        &[
            "train",
            "--tiny",
            "5",
            "--images",
            "photos",
            "--class",
            "dog",
            "--captions",
            "captions.txt",
            "--steps",
            "4",
            "--lr",
            "1e-2",
            "--rank",
            "2",
            "--seed",
            "1",
            "--checkpoint-every",
            "2",
            "--checkpoint-dir",
            "ck",
            "--description-case",
            "sid",
            "--output",
            "lora",
        ],
        dir,
    ));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("lora/pytorch_lora_weights.safetensors"),
        "{}",
        text(&o)
    );
    let lora = dir.join("lora/pytorch_lora_weights.safetensors");
    let header = safetensors_header(&lora);
    let meta = header["__metadata__"].as_object().unwrap();
    assert_eq!(meta["sidbooth.token"], "sks");
    assert_eq!(meta["sidbooth.class"], "dog");
    assert_eq!(meta["sidbooth.base_model"], "sidbooth-tiny:5");
    assert_eq!(meta["sidbooth.description_case"], "sid");
    assert_eq!(meta["sidbooth.steps"], "4");
    assert_eq!(meta["sidbooth.rank"], "2");
    assert!(header
        .keys()
        .any(|k| k.starts_with("unet.") && k.ends_with(".lora_A.weight")));
    let checkpoints = std::fs::read_dir(dir.join("ck")).unwrap().count();
    assert_eq!(checkpoints, 2, "a checkpoint every 2 of 4 steps");

    let gen = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--tiny",
            "5",
            "--prompt",
            "a photo of sks dog",
            "--seed",
            "11",
            "--steps",
            "4",
            "--out",
            out,
        ];
        a.extend_from_slice(extra);
        ok(sidbooth(&a, dir))
    };
    gen("base", &[]);
    let o = gen("tuned", &["--weights", "lora", "--attention-token", "sks"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("lora weights lora"),
        "{}",
        text(&o)
    );

    let base = images(&dir.join("base"));
    let tuned = images(&dir.join("tuned"));
    assert_eq!((base.len(), tuned.len()), (1, 1));
    let t = png_text(&tuned[0]);
    assert_eq!(t["prompt"], "a photo of sks dog");
    assert_eq!(t["seed"], "11");
    assert_eq!(t["steps"], "4");
    assert_eq!(t["guidance_scale"], "7.5");
    assert_eq!(t["base_model"], "sidbooth-tiny:5");
    assert_eq!(t["weights"], "lora");
    assert_eq!(t["method"], "lora");
    assert_eq!((t["width"].as_str(), t["height"].as_str()), ("32", "32"));
    assert_eq!(t["negative_prompt"], "");
    assert_eq!(png_text(&base[0])["weights"], "");
    let (bp, tp) = (pixels(&base[0]), pixels(&tuned[0]));
    assert_eq!(bp.len(), 32 * 32 * 3, "the tiny model's default size");
    assert_ne!(bp, tp, "the trained LoRA changes the image");
    let heatmap = tuned[0]
        .to_string_lossy()
        .replace(".png", "-attention-sks.png");
    assert_eq!(
        pixels(Path::new(&heatmap)).len(),
        bp.len(),
        "heatmap beside the image"
    );
}

#[test]
fn resume_from_checkpoint_matches_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    photos(dir);
    // the service's descriptions.json, matched by file name (given out of order)
    std::fs::write(
        dir.join("descriptions.json"),
        r#"[
          {"idx": 2, "file_name": "02.png", "original_file_name": "c.png", "text": "a photo of sks dog, three", "case": "full"},
          {"idx": 0, "file_name": "00.png", "original_file_name": "a.png", "text": "a photo of sks dog, one", "case": "full"},
          {"idx": 1, "file_name": "01.png", "original_file_name": "b.png", "text": "a photo of sks dog, two", "case": "full"}
        ]"#,
    )
    .unwrap();
    let train = |steps: &str, out: &str, extra: &[&str]| {
        let mut a = vec![
            "train",
            "--tiny",
            "3",
            "--images",
            "photos",
            "--class",
            "dog",
            "--captions",
            "descriptions.json",
            "--steps",
            steps,
            "--lr",
            "1e-3",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
            "--grad-accum",
            "2",
            "--flip",
            "--seed",
            "9",
            "--output",
            out,
        ];
        a.extend_from_slice(extra);
        ok(sidbooth(&a, dir))
    };
    train("4", "full", &[]);
    train(
        "2",
        "half",
        &["--checkpoint-every", "2", "--checkpoint-dir", "ck"],
    );
    train(
        "4",
        "resumed",
        &[
            "--checkpoint-every",
            "2",
            "--checkpoint-dir",
            "ck",
            "--resume",
            "latest",
        ],
    );
    let lora = |out: &str| dir.join(out).join("pytorch_lora_weights.safetensors");
    let meta = safetensors_header(&lora("full"))["__metadata__"].clone();
    assert_eq!(
        meta["sidbooth.description_case"], "full",
        "case taken from descriptions.json"
    );
    let full = safetensors_tensors(&lora("full"));
    let resumed = safetensors_tensors(&lora("resumed"));
    let half = safetensors_tensors(&lora("half"));
    assert_eq!(
        full.keys().collect::<Vec<_>>(),
        resumed.keys().collect::<Vec<_>>()
    );
    for (k, v) in &full {
        assert!(
            *v == resumed[k],
            "{k}: a resumed run writes the same LoRA as an uninterrupted one"
        );
    }
    assert!(
        full.iter().any(|(k, v)| *v != half[k]),
        "two more steps change the LoRA"
    );
    let resumed_meta = safetensors_header(&lora("resumed"))["__metadata__"].clone();
    assert_eq!(meta, resumed_meta);
}

#[test]
fn saved_latents_reproduce_the_image() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for ext in ["safetensors", "npy"] {
        let lat = format!("latents.{ext}");
        let (a, b, c) = (format!("a-{ext}"), format!("b-{ext}"), format!("c-{ext}"));
        let gen = |out: &str, seed: &str, extra: &[&str]| {
            let mut args = vec![
                "generate",
                "--tiny",
                "2",
                "--prompt",
                "a photo of sks dog",
                "--negative-prompt",
                "blurry",
                "--seed",
                seed,
                "--steps",
                "3",
                "--num-images",
                "2",
                "--out",
                out,
            ];
            args.extend_from_slice(extra);
            ok(sidbooth(&args, dir));
            images(&dir.join(out))
        };
        let first = gen(&a, "5", &["--save-latents", &lat]);
        assert!(dir.join(&lat).is_file());
        let again = gen(&b, "77", &["--init-latents", &lat]);
        let other = gen(&c, "77", &[]);
        assert_eq!(first.len(), 2);
        for i in 0..2 {
            assert_eq!(
                pixels(&first[i]),
                pixels(&again[i]),
                "image {i} from the saved latents ({ext})"
            );
            assert_ne!(
                pixels(&first[i]),
                pixels(&other[i]),
                "another seed gives another image"
            );
        }
        assert_ne!(pixels(&first[0]), pixels(&first[1]));
        let t = png_text(&again[0]);
        assert_eq!(t["init_latents"], lat);
        assert_eq!(t["negative_prompt"], "blurry");
    }
}

/// Every image records its own seed: image 1 of a batch is made again, alone, from the seed in
/// its metadata (as the worker makes each image of a job).
#[test]
fn the_recorded_seed_of_a_batch_image_makes_it_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let gen = |out: &str, seed: &str, n: &str| {
        ok(sidbooth(
            &[
                "generate",
                "--tiny",
                "5",
                "--prompt",
                "a photo of sks dog",
                "--steps",
                "3",
                "--seed",
                seed,
                "--num-images",
                n,
                "--out",
                out,
            ],
            dir,
        ))
    };
    gen("batch", "20", "3");
    let batch = images(&dir.join("batch"));
    assert_eq!(batch.len(), 3);
    let seeds: Vec<String> = batch.iter().map(|p| png_text(p)["seed"].clone()).collect();
    assert_eq!(seeds, ["20", "21", "22"]);
    gen("alone", &seeds[1], "1");
    let alone = images(&dir.join("alone"));
    assert_eq!(png_text(&alone[0])["seed"], "21");
    assert_eq!(pixels(&alone[0]), pixels(&batch[1]));
}

#[test]
fn kohya_export_has_kohya_keys_and_generate_says_so() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    photos(dir);
    ok(sidbooth(
        &[
            "train",
            "--tiny",
            "4",
            "--images",
            "photos",
            "--class",
            "dog",
            "--steps",
            "1",
            "--train-text-encoder",
            "--format",
            "kohya",
            "--output",
            "k",
        ],
        dir,
    ));
    let header = safetensors_header(&dir.join("k/pytorch_lora_weights_kohya.safetensors"));
    assert!(header
        .keys()
        .any(|k| k.starts_with("lora_unet_") && k.ends_with(".lora_down.weight")));
    assert!(header.keys().any(|k| k.starts_with("lora_te_")));
    assert!(header.keys().any(|k| k.ends_with(".alpha")));
    fails_with(
        sidbooth(
            &[
                "generate",
                "--tiny",
                "4",
                "--prompt",
                "sks dog",
                "--steps",
                "1",
                "--lora",
                "k/pytorch_lora_weights_kohya.safetensors",
            ],
            dir,
        ),
        "kohya layout",
    );
}

#[test]
fn bad_arguments_fail_clearly() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    photos(dir);
    std::fs::write(
        dir.join("two.txt"),
        "a photo of sks dog\na photo of sks dog\n",
    )
    .unwrap();
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train", "--tiny", "1", "--class", "dog", "--steps", "1", "--output", "x",
        ];
        a.extend_from_slice(extra);
        sidbooth(&a, dir)
    };
    // A dev stack refuses a CORS origin that is not one, before it starts anything.
    fails_with(
        sidbooth(&["dev", "--cors-allowed-origins", "app.example.com"], dir),
        "is not an origin like https://app.example.com",
    );
    let generate = |extra: &[&str]| {
        let mut a = vec!["generate", "--tiny", "1", "--steps", "1"];
        a.extend_from_slice(extra);
        sidbooth(&a, dir)
    };
    fails_with(train(&[]), "--images");
    fails_with(train(&["--images", "missing"]), "not a directory");
    fails_with(
        train(&["--images", "photos", "--captions", "two.txt"]),
        "2 captions",
    );
    fails_with(
        train(&["--images", "photos", "--captions", "nope.txt"]),
        "nope.txt",
    );
    fails_with(
        train(&["--images", "photos", "--checkpoint-every", "1"]),
        "--checkpoint-dir",
    );
    fails_with(
        train(&["--images", "photos", "--resume", "latest"]),
        "--checkpoint-dir",
    );
    fails_with(
        train(&["--images", "photos", "--lr", "fast"]),
        "invalid value",
    );
    fails_with(
        train(&["--images", "photos", "--lr-schedule", "linear"]),
        "invalid value",
    );
    fails_with(
        train(&["--images", "photos", "--method", "full"]),
        "unknown method",
    );
    fails_with(
        train(&[
            "--images",
            "photos",
            "--method",
            "textual_inversion",
            "--rank",
            "4",
        ]),
        "rank",
    );
    fails_with(
        train(&["--images", "photos", "--settings", "{\"rank\": 0}"]),
        "train.rank",
    );
    std::fs::write(dir.join("a-file"), "x").unwrap();
    fails_with(
        sidbooth(
            &[
                "train", "--tiny", "1", "--images", "photos", "--class", "dog", "--output",
                "a-file",
            ],
            dir,
        ),
        "--output is the directory",
    );
    fails_with(
        train(&["--images", "photos", "--masks", "no-masks"]),
        "--masks: no mask",
    );
    fails_with(
        train(&["--images", "photos", "--prior-preservation"]),
        "--class-dir",
    );
    fails_with(
        train(&["--images", "photos", "--class-dir", "cls"]),
        "--prior-preservation",
    );
    fails_with(
        train(&["--images", "photos", "--model", "m"]),
        "cannot be used with",
    );
    fails_with(
        train(&["--images", "photos", "--resolution", "33"]),
        "--resolution 33",
    );
    assert!(!dir.join("x").exists());

    fails_with(sidbooth(&["generate", "--prompt", "x"], dir), "--model");
    fails_with(generate(&[]), "--prompt");
    fails_with(
        generate(&["--prompt", "x", "--device", "tpu"]),
        "unknown device",
    );
    fails_with(
        generate(&["--prompt", "x", "--dtype", "f16"]),
        "needs a GPU",
    );
    fails_with(
        generate(&["--prompt", "x", "--lora", "none.safetensors"]),
        "no such file",
    );
    fails_with(
        generate(&["--prompt", "x", "--lora-scale", "0.5"]),
        "--weights",
    );
    fails_with(
        generate(&["--prompt", "x", "--weights", "photos"]),
        "holds no trained weights",
    );
    fails_with(
        generate(&["--prompt", "a dog", "--attention-token", "sks"]),
        "does not occur",
    );
    fails_with(generate(&["--prompt", "x", "--height", "33"]), "multiples");
    fails_with(
        sidbooth(&["generate", "--model", "nowhere", "--prompt", "x"], dir),
        "not a directory",
    );
    #[cfg(not(feature = "cuda"))]
    fails_with(
        generate(&["--prompt", "x", "--device", "cuda:0"]),
        "without CUDA support",
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_after_the_step_keeping_only_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    photos(dir);
    let mut child = Command::new(BIN)
        .args([
            "train",
            "--tiny",
            "1",
            "--images",
            "photos",
            "--class",
            "dog",
            "--steps",
            "20000",
            "--checkpoint-every",
            "1",
            "--checkpoint-dir",
            "ck",
            "--output",
            "never",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ck = dir.join("ck");
    let start = std::time::Instant::now();
    while !std::fs::read_dir(&ck)
        .map(|mut r| r.next().is_some())
        .unwrap_or(false)
    {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint appeared");
        if let Some(s) = child.try_wait().unwrap() {
            panic!("train exited early: {s:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("canceled after") && err.contains("checkpoint"),
        "{}",
        text(&o)
    );
    assert!(!dir.join("never").exists());
    assert!(std::fs::read_dir(&ck).unwrap().count() >= 1);
}

#[test]
fn prior_preservation_samples_missing_class_images_once() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    photos(dir);
    let train = |out: &str| {
        ok(sidbooth(
            &[
                "train",
                "--tiny",
                "6",
                "--images",
                "photos",
                "--class",
                "dog",
                "--steps",
                "2",
                "--prior-preservation",
                "--class-dir",
                "class",
                "--num-class-images",
                "2",
                "--class-sample-steps",
                "2",
                "--output",
                out,
            ],
            dir,
        ))
    };
    train("a");
    let mut class: Vec<PathBuf> = std::fs::read_dir(dir.join("class"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    class.sort();
    assert_eq!(class.len(), 2, "{class:?}");
    assert_eq!(
        image::image_dimensions(&class[0]).unwrap(),
        (32, 32),
        "at the training resolution"
    );
    let before: Vec<Vec<u8>> = class.iter().map(|p| std::fs::read(p).unwrap()).collect();
    train("b");
    assert_eq!(std::fs::read_dir(dir.join("class")).unwrap().count(), 2);
    let after: Vec<Vec<u8>> = class.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(before, after, "existing class images are reused");
    assert_eq!(
        safetensors_tensors(&dir.join("a/pytorch_lora_weights.safetensors")),
        safetensors_tensors(&dir.join("b/pytorch_lora_weights.safetensors"))
    );
}
