//! Writes the seeded tiny model as a diffusers directory plus a 5-step CFG run of ours, so that
//! `scripts/parity/check_tiny_dir.py DIR` can load the directory in diffusers and compare.
//!
//! cargo run -p sidbooth-engine --example tiny_dir -- OUT_DIR [SEED]

use sidbooth_engine::pipeline::{save_latents, GenerateRequest};
use sidbooth_engine::tiny::TinyModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = std::path::PathBuf::from(args.get(1).ok_or("usage: tiny_dir OUT_DIR [SEED]")?);
    let seed: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let m = TinyModel::build(seed)?;
    m.save_diffusers_dir(&out)?;
    let req = GenerateRequest {
        prompt: "a photo of sks dog".into(),
        negative_prompt: Some("blurry".into()),
        steps: 5,
        seed: 42,
        ..Default::default()
    };
    let r = m.sd.generate(&req, None, None)?;
    save_latents(&r.init_latents, &out.join("ours_init_latents.safetensors"))?;
    save_latents(&r.latents, &out.join("ours_final_latents.safetensors"))?;
    println!("wrote {}", out.display());
    Ok(())
}
