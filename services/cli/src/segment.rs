//! `sidbooth segment --sam DIR --image FILE [--box x0,y0,x1,y1] --out mask.png`: one subject
//! mask with SAM, the way describe makes them.
//!
//! With `--box` (pixels of the image, SAM's XYXY), SAM's single mask for that box. Without it,
//! the subject is found as describe does when no vision-language model is configured: SAM's
//! automatic proposals ranked by CLIP (`--clip`) against "a photo of a {--class}", then SAM
//! with the winner's box.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sidbooth_evaluate::{
    clip::ClipModel,
    mask::PixelBox,
    sam::{ProposalSettings, Sam},
    subject::{segment_automatically, segment_box},
};

use crate::model::{parse_device, DeviceSpec};

#[derive(clap::Args, Debug)]
pub struct SegmentArgs {
    /// SAM directory (facebookresearch checkpoint as model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub sam: PathBuf,
    /// The photo.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The subject's box in pixels: x0,y0,x1,y1.
    #[arg(long = "box", value_name = "x0,y0,x1,y1", value_parser = parse_box)]
    pub prompt_box: Option<PixelBox>,
    /// Without --box: CLIP directory to rank SAM's proposals with.
    #[arg(long, value_name = "DIR")]
    pub clip: Option<PathBuf>,
    /// Without --box: the subject's class, e.g. dog.
    #[arg(long = "class", value_name = "NAME")]
    pub class: Option<String>,
    /// Where the mask PNG goes (white = subject).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
}

fn parse_box(s: &str) -> Result<PixelBox, String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?}: expected four numbers x0,y0,x1,y1"))?;
    match v[..] {
        [x0, y0, x1, y1] if x0 < x1 && y0 < y1 && v.iter().all(|c| c.is_finite()) => {
            Ok(PixelBox { x0, y0, x1, y1 })
        }
        [_, _, _, _] => Err(format!("{s:?}: need x0 < x1 and y0 < y1")),
        _ => Err(format!("{s:?}: expected four numbers x0,y0,x1,y1")),
    }
}

pub fn run(args: SegmentArgs) -> Result<()> {
    let device = args.device.open()?;
    let photo = image::open(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .to_rgb8();
    let sam = Sam::load(&args.sam, &device).context("loading SAM")?;
    let found = match args.prompt_box {
        Some(b) => {
            if b.x1 > photo.width() as f32 + 1.0 || b.y1 > photo.height() as f32 + 1.0 {
                bail!(
                    "--box {b:?} is outside the {}x{} image",
                    photo.width(),
                    photo.height()
                );
            }
            segment_box(&sam, &photo, b)?
        }
        None => {
            let (Some(clip), Some(class)) = (&args.clip, &args.class) else {
                bail!(
                    "without --box, give --clip DIR and --class NAME to find the subject among \
                     SAM's proposals"
                );
            };
            let clip = ClipModel::load(clip, &device).context("loading CLIP")?;
            segment_automatically(&sam, &clip, &photo, class, &ProposalSettings::default())?
                .context("SAM proposed no region in this image")?
        }
    };
    if found.mask.area() == 0 {
        bail!("SAM found no subject pixels for this box");
    }
    std::fs::write(&args.out, found.mask.to_png())
        .with_context(|| format!("writing {}", args.out.display()))?;
    let b = found.prompt_box;
    eprintln!(
        "mask covers {:.1}% of the image (box {:.0},{:.0},{:.0},{:.0}{})",
        100.0 * found.mask.coverage(),
        b.x0,
        b.y0,
        b.x1,
        b.y1,
        found
            .score
            .map(|s| format!(", CLIP score {s:.3}"))
            .unwrap_or_default()
    );
    println!("{}", args.out.display());
    Ok(())
}
