//! Time of SAM's steps on a photo: loading, `embed`, `mask_for_box` (one box, as Grounded-SAM)
//! and `proposals` (default settings), on the CPU.
//!
//! ```sh
//! cargo run -p sidbooth-evaluate --example bench_sam -- tiny [PHOTO]
//! cargo run -p sidbooth-evaluate --example bench_sam -- vit_b [PHOTO]   # seeded ViT-B weights
//! cargo run -p sidbooth-evaluate --example bench_sam -- DIR [PHOTO]     # a SAM directory
//! ```
//!
//! Random ViT-B weights cost what the real checkpoint costs: same sizes, same arithmetic.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use sidbooth_evaluate::mask::PixelBox;
use sidbooth_evaluate::sam::{ProposalSettings, Sam, SamConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("tiny");
    let default_photo = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/sam-photo.png");
    let photo = image::open(args.get(1).map(String::as_str).unwrap_or(default_photo))?.to_rgb8();
    let dev = Device::Cpu;

    let t = Instant::now();
    let sam = match which {
        "tiny" => Sam::tiny(0, &dev)?,
        "vit_b" => Sam::seeded(SamConfig::vit_b(), 0, &dev)?,
        dir => Sam::load(Path::new(dir), &dev)?,
    };
    println!("{which}: load {:.2} s", t.elapsed().as_secs_f64());

    let (w, h) = (photo.width() as f32, photo.height() as f32);
    let b = PixelBox {
        x0: 0.1 * w,
        y0: 0.1 * h,
        x1: 0.7 * w,
        y1: 0.9 * h,
    };
    let t = Instant::now();
    let emb = sam.embed(&photo)?;
    let embed_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mask = sam.predict_boxes(&emb, &[b], false)?.mask(0, 0)?;
    let decode_s = t.elapsed().as_secs_f64();
    println!(
        "{}x{} photo: embed {embed_s:.2} s, box mask {decode_s:.3} s ({} subject px)",
        photo.width(),
        photo.height(),
        mask.area()
    );

    let t = Instant::now();
    let settings = ProposalSettings::default();
    let proposals = sam.proposals(&photo, &settings)?;
    println!(
        "proposals ({}² points): {:.2} s, {} kept",
        settings.points_per_side,
        t.elapsed().as_secs_f64(),
        proposals.len()
    );
    Ok(())
}
