//! `resize_rgb` / `resize_gray` against Pillow's `Image.resize`, byte for byte, for every
//! filter at down- and up-sampling sizes (fixtures from scripts/parity/make_resample_fixtures.py).

use std::path::PathBuf;

use sidbooth_imaging::{resize_gray, resize_rgb, Filter};

const FILTERS: [(&str, Filter); 6] = [
    ("nearest", Filter::Nearest),
    ("box", Filter::Box),
    ("bilinear", Filter::Bilinear),
    ("hamming", Filter::Hamming),
    ("bicubic", Filter::Bicubic),
    ("lanczos", Filter::Lanczos),
];
const SIZES: [(u32, u32); 5] = [(16, 11), (64, 50), (37, 5), (80, 23), (7, 40)];

fn fixture(name: &str) -> image::DynamicImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/resample")
        .join(name);
    image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn rgb_resizes_match_pillow_exactly() {
    let input = fixture("input.png").to_rgb8();
    for (name, filter) in FILTERS {
        for (w, h) in SIZES {
            let ours = resize_rgb(&input, w, h, filter);
            let pillow = fixture(&format!("{name}-{w}x{h}.png")).to_rgb8();
            let differing = ours
                .as_raw()
                .iter()
                .zip(pillow.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "{name} {w}x{h}: {differing} bytes differ");
        }
    }
}

#[test]
fn gray_resizes_match_pillow_exactly() {
    let input = fixture("input-gray.png").to_luma8();
    for (name, filter) in FILTERS {
        for (w, h) in SIZES {
            let ours = resize_gray(&input, w, h, filter);
            let pillow = fixture(&format!("gray-{name}-{w}x{h}.png")).to_luma8();
            assert_eq!(ours.as_raw(), pillow.as_raw(), "{name} {w}x{h}");
        }
    }
}
