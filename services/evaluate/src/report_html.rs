//! `report.html`: [`Report`] as one self-contained page a person opens in any browser, on a phone
//! or a laptop, offline.
//!
//! Nothing is loaded from anywhere: the style sheet is inline, the charts are inline SVG, there
//! is no script, and every image is a `data:` URI. A Content-Security-Policy meta tag makes the
//! browser refuse any other load, so a mistake shows up as a console error instead of a silent
//! request. Images are decoded here first: one that is missing or cannot be decoded becomes a
//! text placeholder, never a broken `<img>`. Images larger than [`MAX_SIDE`] (the reference
//! photos, full-size generated images) are downscaled and re-encoded as JPEG to keep the file
//! small; the originals stay in the job's artifacts.
//!
//! All text from the report (prompts and descriptions are user input) is HTML-escaped.
//!
//! Hooks the browser tests rely on: `#meaningless-warning` (the banner),
//! `table#measures tr[data-measure]` (one row per measure), `svg#measures-chart`,
//! `section.prompt` (one per prompt), `svg#loss-curve`, `img[data-asset]` (the asset's name) and
//! `.missing[data-missing]` (a placeholder).

use std::collections::BTreeMap;
use std::io::Cursor;

use base64::Engine as _;
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use sidbooth_domain::report::{MaskSource, MeasureValues, PromptEntry, ReferenceEntry, Report};

/// Appends formatted text to a `&mut String` (writing to a `String` cannot fail).
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        let _ = std::fmt::Write::write_fmt($out, format_args!($($arg)*));
    }};
}

/// Longest side, in pixels, of an image as embedded.
pub const MAX_SIDE: u32 = 384;
const JPEG_QUALITY: u8 = 85;

/// Images the report shows, by the names `report.json` uses (reference names, `masks/00.png`,
/// `images/00-01.png`, `attention/00-01.png`, ...).
#[derive(Debug, Clone, Default)]
pub struct ReportAssets {
    files: BTreeMap<String, (String, Vec<u8>)>,
}

impl ReportAssets {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the image called `name`, with its MIME type (`image/png`, ...).
    pub fn insert(&mut self, name: impl Into<String>, mime: &str, bytes: Vec<u8>) {
        self.files.insert(name.into(), (mime.to_owned(), bytes));
    }

    /// The MIME type and bytes of the image called `name`.
    pub fn get(&self, name: &str) -> Option<(&str, &[u8])> {
        self.files
            .get(name)
            .map(|(mime, bytes)| (mime.as_str(), bytes.as_slice()))
    }
}

/// The page for `report`, showing the images in `assets`.
pub fn render(report: &Report, assets: &ReportAssets) -> String {
    let title = format!("sidbooth report: {} {}", report.token, report.subject_class);
    let mut out = String::with_capacity(64 * 1024);
    put!(
        &mut out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         img-src data:; style-src 'unsafe-inline'\">\n\
         <link rel=\"icon\" href=\"data:,\">\n<title>{}</title>\n<style>{STYLE}</style>\n\
         </head>\n<body>\n",
        esc(&title)
    );
    header(&mut out, report, &title);
    out.push_str("<main>\n");
    notices(&mut out, report);
    summary(&mut out, report);
    references(&mut out, report, assets);
    prompts(&mut out, report, assets);
    training(&mut out, report);
    models(&mut out, report);
    settings(&mut out, report);
    timings(&mut out, report);
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

const STYLE: &str = "\
*,*::before,*::after{box-sizing:border-box}\
body{margin:0;font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1c1e21;\
background:#f6f7f9;overflow-wrap:anywhere}\
header,main{max-width:72rem;margin:0 auto;padding:1rem}\
header{background:#fff;border-bottom:1px solid #dde1e6;max-width:none}\
header>*{max-width:70rem;margin-left:auto;margin-right:auto}\
h1{font-size:1.5rem;margin:.25rem auto}h2{font-size:1.25rem;margin-top:2rem}\
h3{font-size:1.05rem}\
dl.facts{display:flex;flex-wrap:wrap;gap:.25rem 1.5rem;margin:.5rem auto}\
dl.facts div{display:flex;gap:.4rem;min-width:0}dt{font-weight:600;white-space:nowrap}\
dd{margin:0}\
.warning{background:#fff3cd;border:2px solid #d39e00;border-radius:.5rem;padding:.75rem 1rem;\
margin:.75rem auto;font-size:1.05rem}\
.scroll{overflow-x:auto;max-width:100%}\
table{border-collapse:collapse;background:#fff;font-size:.95rem}\
th,td{border:1px solid #dde1e6;padding:.35rem .6rem;text-align:left;vertical-align:top;\
overflow-wrap:normal}\
td.meaning{min-width:15rem}.nowrap{white-space:nowrap}\
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
th{background:#eef1f4}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,17rem),1fr));gap:1rem;\
margin-top:1rem}\
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:.5rem;padding:.5rem}\
figcaption{font-size:.9rem;margin-top:.4rem}\
.pictures{display:grid;grid-template-columns:repeat(auto-fit,minmax(6rem,1fr));gap:.35rem}\
img{max-width:100%;height:auto;display:block;border-radius:.25rem}\
.missing{display:flex;align-items:center;justify-content:center;min-height:6rem;padding:.5rem;\
background:#eef1f4;border:1px dashed #98a2ad;border-radius:.25rem;font-size:.85rem;color:#4a525b}\
.note{color:#8a5a00;font-weight:600}\
dl.scores{display:grid;grid-template-columns:auto auto;gap:0 .75rem;margin:.25rem 0}\
dl.scores dd{text-align:right;font-variant-numeric:tabular-nums}\
svg.chart{width:100%;max-width:30rem;height:auto;display:block;margin-top:1rem;background:#fff;\
border:1px solid #dde1e6;border-radius:.5rem}\
pre{background:#fff;border:1px solid #dde1e6;border-radius:.5rem;padding:.75rem;overflow-x:auto;\
font-size:.85rem;overflow-wrap:normal}\
details{margin-top:1rem}\
";

// ---------------------------------------------------------------------------------------------
// Sections, in page order.

fn header(out: &mut String, report: &Report, title: &str) {
    put!(
        out,
        "<header>\n<h1>{}</h1>\n<dl class=\"facts\">",
        esc(title)
    );
    let job = report.job_id.as_deref().unwrap_or("—");
    for (term, value) in [
        ("Subject", report.subject_class.as_str()),
        ("Token", report.token.as_str()),
        ("Job", job),
    ] {
        put!(out, "<div><dt>{term}</dt><dd>{}</dd></div>", esc(value));
    }
    put!(
        out,
        "<div><dt>Date</dt><dd><time datetime=\"{0}\">{0}</time></dd></div></dl>\n",
        esc(&report.created_at)
    );
    if !report.meaningful {
        let random: Vec<String> = report
            .models
            .iter()
            .filter(|m| m.random_weights)
            .map(|m| format!("{} ({})", esc(&m.name), esc(&m.role)))
            .collect();
        put!(
            out,
            "<div class=\"warning\" id=\"meaningless-warning\" role=\"alert\">\
             <strong>These numbers mean nothing.</strong> They were made with random-weight \
             models{}, which exist to test the pipeline: they say nothing about the images.</div>\n",
            if random.is_empty() {
                String::new()
            } else {
                format!(": {}", random.join(", "))
            }
        );
    }
    out.push_str("</header>\n");
}

fn notices(out: &mut String, report: &Report) {
    if report.notices.is_empty() {
        return;
    }
    out.push_str("<section id=\"notices\">\n<h2>Notices</h2>\n<ul>\n");
    for notice in &report.notices {
        put!(out, "<li>{}</li>\n", esc(notice));
    }
    out.push_str("</ul>\n</section>\n");
}

/// What each measure is, for readers who have not read the paper. All six are similarities or
/// shares: higher is better for each.
struct MeasureInfo {
    name: &'static str,
    label: &'static str,
    meaning: &'static str,
    /// The paper's value for SID with DreamBooth (Tab. E.3), where it reports one.
    paper: Option<f64>,
}

const MEASURES: [MeasureInfo; 6] = [
    MeasureInfo {
        name: "clip_i",
        label: "CLIP-I",
        meaning: "CLIP image similarity of the generated images to the reference photos \
                  (DreamBooth).",
        paper: None,
    },
    MeasureInfo {
        name: "dino",
        label: "DINO",
        meaning: "DINO image similarity to the reference photos (DreamBooth).",
        paper: None,
    },
    MeasureInfo {
        name: "subject_alignment",
        label: "subject-alignment",
        meaning: "Similarity to the subject alone, cut out of the references: the subject \
                  was kept.",
        paper: Some(0.686),
    },
    MeasureInfo {
        name: "non_subject_disentanglement",
        label: "non-subject-disentanglement",
        meaning: "1 − similarity to the references with the subject blacked out: their \
                  background and nearby objects were not copied.",
        paper: Some(0.352),
    },
    MeasureInfo {
        name: "text_alignment",
        label: "text-alignment",
        meaning: "Similarity of the images to their prompt without the identifier (CLIP-T): \
                  the prompt was followed.",
        paper: Some(0.317),
    },
    MeasureInfo {
        name: "attention_on_subject",
        label: "attention on subject",
        meaning: "Share of the identifier's cross-attention that falls on the generated \
                  subject: the identifier is bound to the subject.",
        paper: None,
    },
];

fn summary(out: &mut String, report: &Report) {
    out.push_str(
        "<section id=\"summary\">\n<h2>Measures</h2>\n<p>Means over every prompt, generated \
         image and reference photo.</p>\n<div class=\"scroll\"><table id=\"measures\">\n\
         <thead><tr><th scope=\"col\">Measure</th><th scope=\"col\">Value</th>\
         <th scope=\"col\">Paper (SID, DreamBooth)</th><th scope=\"col\">Meaning</th>\
         <th scope=\"col\">Better</th></tr></thead>\n<tbody>\n",
    );
    for (info, (_, value)) in MEASURES.iter().zip(report.measures.named()) {
        // The reason goes beside the meaning, keeping the value column narrow on a phone.
        let left_out = match value {
            Some(_) => String::new(),
            None => format!(
                "<span class=\"note\">Left out: {}.</span> ",
                esc(&left_out_reason(report, info.name))
            ),
        };
        put!(
            out,
            "<tr data-measure=\"{}\"><th scope=\"row\">{}</th><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"meaning\">{left_out}{}</td>\
             <td class=\"nowrap\">higher is better</td></tr>\n",
            info.name,
            info.label,
            optional(value),
            optional(info.paper),
            esc(info.meaning)
        );
    }
    out.push_str("</tbody>\n</table></div>\n");
    measures_chart(out, &report.measures);
    out.push_str("</section>\n");
}

fn left_out_reason(report: &Report, measure: &str) -> String {
    let reasons: Vec<&str> = report
        .left_out
        .iter()
        .filter(|l| l.measure == measure)
        .map(|l| l.reason.as_str())
        .collect();
    if reasons.is_empty() {
        "not computed".into()
    } else {
        reasons.join("; ")
    }
}

fn references(out: &mut String, report: &Report, assets: &ReportAssets) {
    out.push_str(
        "<section id=\"references\">\n<h2>Reference photos</h2>\n<p>Each photo with its train \
         description and, where there is one, its subject mask: what lies outside the mask is \
         darkened.</p>\n<div class=\"grid\">\n",
    );
    for reference in &report.references {
        out.push_str("<figure class=\"reference\">\n<div class=\"pictures\">");
        reference_pictures(out, reference, assets);
        put!(
            out,
            "</div>\n<figcaption><strong>{}</strong>",
            esc(&reference.name)
        );
        match &reference.description {
            Some(description) => put!(out, "<p>{}</p>", esc(description)),
            None => out.push_str("<p>No description.</p>"),
        }
        if let Some(tokens) = reference.description_tokens {
            put!(out, "<p>{tokens} CLIP tokens.</p>");
        }
        if reference.description_cut {
            out.push_str(
                "<p class=\"note\">Cut: longer than the text encoder reads, so the end of \
                 this description never trained.</p>",
            );
        }
        put!(
            out,
            "<p>{}</p></figcaption>\n</figure>\n",
            mask_caption(reference)
        );
    }
    out.push_str("</div>\n</section>\n");
}

/// The photo and its mask overlaid on it; the mask alone when the photo is missing.
fn reference_pictures(out: &mut String, reference: &ReferenceEntry, assets: &ReportAssets) {
    let photo = decode(assets, &reference.name).map(|image| fit(image).to_rgb8());
    let photo_alt = format!("Reference photo {}", reference.name);
    match &photo {
        Ok(rgb) => img(out, &reference.name, &photo_alt, &jpeg(rgb)),
        Err(reason) => missing(out, &reference.name, &photo_alt, reason),
    }
    let Some(mask_name) = &reference.mask else {
        return;
    };
    let mask_alt = format!("Subject mask of {}", reference.name);
    let overlay = decode(assets, mask_name).map(|mask| match &photo {
        Ok(rgb) => jpeg(&overlay(rgb, &mask.to_luma8())),
        Err(_) => embedded(fit(mask)),
    });
    match overlay {
        Ok(shown) => img(out, mask_name, &mask_alt, &shown),
        Err(reason) => missing(out, mask_name, &mask_alt, &reason),
    }
}

fn mask_caption(reference: &ReferenceEntry) -> String {
    if reference.mask.is_none() {
        return "No subject mask.".into();
    }
    let source = match reference.mask_source {
        Some(MaskSource::Uploaded) => "uploaded",
        Some(MaskSource::SamVlmBox) => "SAM, prompted with the vision-language model's box",
        Some(MaskSource::SamClipRanked) => "SAM, the proposal CLIP ranks closest to the class",
        None => "source unknown",
    };
    match reference.mask_coverage {
        Some(c) => format!("Mask: {source}; covers {:.1} % of the photo.", c * 100.0),
        None => format!("Mask: {source}."),
    }
}

fn prompts(out: &mut String, report: &Report, assets: &ReportAssets) {
    out.push_str("<section id=\"prompts\">\n<h2>Prompts</h2>\n");
    for (index, prompt) in report.prompts.iter().enumerate() {
        prompt_section(out, index, prompt, assets);
    }
    out.push_str("</section>\n");
}

fn prompt_section(out: &mut String, index: usize, prompt: &PromptEntry, assets: &ReportAssets) {
    put!(
        out,
        "<section class=\"prompt\" id=\"prompt-{index}\">\n<h3>Prompt {}: “{}”</h3>\n\
         <p>Text compared with the images: “{}”.</p>\n",
        index + 1,
        esc(&prompt.prompt),
        esc(&prompt.text)
    );
    out.push_str(
        "<div class=\"scroll\"><table class=\"prompt-measures\"><thead><tr>\
         <th scope=\"col\">Measure</th><th scope=\"col\">Mean</th></tr></thead><tbody>",
    );
    for (info, (_, value)) in MEASURES.iter().zip(prompt.measures.named()) {
        put!(
            out,
            "<tr><th scope=\"row\">{}</th><td class=\"num\">{}</td></tr>",
            info.label,
            optional(value)
        );
    }
    out.push_str("</tbody></table></div>\n<div class=\"grid\">\n");
    for image in &prompt.images {
        out.push_str("<figure class=\"generated\">\n<div class=\"pictures\">");
        let alt = format!("Generated image {} for prompt {}", image.name, index + 1);
        shown_as_is(out, assets, &image.name, &alt);
        if let Some(attention) = &image.attention {
            let alt = format!("Identifier attention over {}", image.name);
            shown_as_is(out, assets, attention, &alt);
        }
        put!(
            out,
            "</div>\n<figcaption><strong>{}</strong>",
            esc(&image.name)
        );
        if let Some(seed) = image.seed {
            put!(out, " · seed {seed}");
        }
        if image.attention.is_some() {
            out.push_str("<br>Right: where the identifier attends.");
        }
        scores(out, &image.measures);
        out.push_str("</figcaption>\n</figure>\n");
    }
    out.push_str("</div>\n");
    pairs(out, prompt);
    out.push_str("</section>\n");
}

/// The measures an image has, as a small definition list.
fn scores(out: &mut String, measures: &MeasureValues) {
    let present: Vec<(&MeasureInfo, f64)> = MEASURES
        .iter()
        .zip(measures.named())
        .filter_map(|(info, (_, value))| value.map(|v| (info, v)))
        .collect();
    if present.is_empty() {
        out.push_str("<p>No scores.</p>");
        return;
    }
    out.push_str("<dl class=\"scores\">");
    for (info, value) in present {
        put!(out, "<dt>{}</dt><dd>{}</dd>", info.label, number(value));
    }
    out.push_str("</dl>");
}

/// The pair matrices behind the means: which reference each image resembles.
fn pairs(out: &mut String, prompt: &PromptEntry) {
    let p = &prompt.pairs;
    let matrices = [
        ("CLIP-I", &p.clip_i),
        ("DINO", &p.dino),
        ("subject-alignment", &p.subject_alignment),
        (
            "non-subject-disentanglement",
            &p.non_subject_disentanglement,
        ),
    ];
    if matrices.iter().all(|(_, m)| m.is_none()) {
        return;
    }
    out.push_str("<details><summary>Scores per reference photo and image</summary>\n");
    for (label, matrix) in matrices {
        let Some(rows) = matrix else { continue };
        put!(
            out,
            "<h4>{label}</h4><div class=\"scroll\"><table><thead><tr><th scope=\"col\">\
             reference \\ image</th>"
        );
        for name in &p.images {
            put!(out, "<th scope=\"col\">{}</th>", esc(name));
        }
        out.push_str("</tr></thead><tbody>");
        for (name, row) in p.references.iter().zip(rows) {
            put!(out, "<tr><th scope=\"row\">{}</th>", esc(name));
            for value in row {
                put!(out, "<td class=\"num\">{}</td>", number(*value));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table></div>\n");
    }
    out.push_str("</details>\n");
}

fn training(out: &mut String, report: &Report) {
    let Some(training) = &report.training else {
        return;
    };
    put!(
        out,
        "<section id=\"training\">\n<h2>Training</h2>\n<p>{}, {} steps; last loss {}.</p>\n",
        esc(&training.method),
        training.steps,
        optional(training.last_loss)
    );
    loss_curve(out, &training.losses);
    out.push_str("</section>\n");
}

fn models(out: &mut String, report: &Report) {
    out.push_str(
        "<section id=\"models\">\n<h2>Models</h2>\n<div class=\"scroll\"><table><thead><tr>\
         <th scope=\"col\">Role</th><th scope=\"col\">Model</th>\
         <th scope=\"col\">Random weights</th></tr></thead><tbody>\n",
    );
    for model in &report.models {
        put!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&model.role),
            esc(&model.name),
            if model.random_weights { "yes" } else { "no" }
        );
    }
    out.push_str("</tbody></table></div>\n</section>\n");
}

fn settings(out: &mut String, report: &Report) {
    let pretty = serde_json::to_string_pretty(&report.settings)
        .unwrap_or_else(|_| report.settings.to_string());
    put!(
        out,
        "<section id=\"settings\">\n<h2>Settings</h2>\n<pre><code>{}</code></pre>\n</section>\n",
        esc(&pretty)
    );
}

fn timings(out: &mut String, report: &Report) {
    out.push_str(
        "<section id=\"timings\">\n<h2>Timings</h2>\n<div class=\"scroll\"><table><thead><tr>\
         <th scope=\"col\">Phase</th><th scope=\"col\">Seconds</th></tr></thead><tbody>\n",
    );
    for (phase, seconds) in &report.timings {
        put!(
            out,
            "<tr><td>{}</td><td class=\"num\">{seconds:.2}</td></tr>\n",
            esc(phase)
        );
    }
    let total: f64 = report.timings.values().sum();
    put!(
        out,
        "</tbody><tfoot><tr><th scope=\"row\">total</th><td class=\"num\">{total:.2}</td></tr>\
         </tfoot></table></div>\n</section>\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Charts. Inline SVG with a viewBox, so they scale with the page; the text sizes are chosen to
// stay legible at a phone's width.

const CHART_WIDTH: f64 = 420.0;
const CHART_MARGIN: f64 = 10.0;

/// One bar per measure on a 0..1 scale, with the paper's values as marks.
fn measures_chart(out: &mut String, measures: &MeasureValues) {
    const ROW: f64 = 48.0;
    let span = CHART_WIDTH - 2.0 * CHART_MARGIN;
    let x = |v: f64| CHART_MARGIN + v.clamp(0.0, 1.0) * span;
    let axis_y = 8.0 + ROW * MEASURES.len() as f64;
    let height = axis_y + 50.0;
    put!(
        out,
        "<svg class=\"chart\" id=\"measures-chart\" viewBox=\"0 0 {CHART_WIDTH} {height}\" \
         role=\"img\" aria-labelledby=\"measures-chart-title\" font-size=\"15\" \
         font-family=\"system-ui,sans-serif\">\n<title id=\"measures-chart-title\">The \
         measures on a scale from 0 to 1, with the paper's values for SID with DreamBooth\
         </title>\n"
    );
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
        put!(
            out,
            "<line x1=\"{at:.1}\" x2=\"{at:.1}\" y1=\"4\" y2=\"{axis_y}\" stroke=\"#dde1e6\"/>\
             <text x=\"{at:.1}\" y=\"{label_y}\" text-anchor=\"middle\" fill=\"#4a525b\">{tick}\
             </text>\n",
            at = x(tick),
            label_y = axis_y + 16.0
        );
    }
    for (row, (info, (_, value))) in MEASURES.iter().zip(measures.named()).enumerate() {
        let top = 8.0 + ROW * row as f64;
        let (text_y, bar_y) = (top + 15.0, top + 22.0);
        put!(
            out,
            "<text x=\"{CHART_MARGIN}\" y=\"{text_y}\">{label}</text>\
             <text x=\"{right}\" y=\"{text_y}\" text-anchor=\"end\" font-weight=\"600\">{shown}\
             </text>\n<rect x=\"{CHART_MARGIN}\" y=\"{bar_y}\" width=\"{span}\" height=\"16\" \
             fill=\"#eef1f4\"/>\n",
            label = info.label,
            right = CHART_WIDTH - CHART_MARGIN,
            shown = value.map(number).unwrap_or_else(|| "— left out".into()),
        );
        if let Some(v) = value {
            put!(
                out,
                "<rect class=\"bar\" x=\"{CHART_MARGIN}\" y=\"{bar_y}\" width=\"{width:.1}\" \
                 height=\"16\" fill=\"#3a6ea5\"/>\n",
                width = x(v) - CHART_MARGIN
            );
        }
        if let Some(paper) = info.paper {
            put!(
                out,
                "<line class=\"paper-mark\" x1=\"{at:.1}\" x2=\"{at:.1}\" y1=\"{y1}\" \
                 y2=\"{y2}\" stroke=\"#c0392b\" stroke-width=\"3\"/>\n",
                at = x(paper),
                y1 = bar_y - 4.0,
                y2 = bar_y + 20.0
            );
        }
    }
    let legend_y = axis_y + 42.0;
    let mark_x = CHART_MARGIN + 130.0;
    put!(
        out,
        "<rect x=\"{CHART_MARGIN}\" y=\"{box_y}\" width=\"16\" height=\"12\" fill=\"#3a6ea5\"/>\
         <text x=\"{text_x}\" y=\"{legend_y}\">this report</text>\
         <line x1=\"{mark_x}\" x2=\"{mark_x}\" y1=\"{mark_top}\" y2=\"{mark_bottom}\" \
         stroke=\"#c0392b\" stroke-width=\"3\"/>\
         <text x=\"{paper_x}\" y=\"{legend_y}\">paper (SID, DreamBooth)</text>\n</svg>\n",
        box_y = legend_y - 11.0,
        text_x = CHART_MARGIN + 22.0,
        mark_top = legend_y - 14.0,
        mark_bottom = legend_y + 3.0,
        paper_x = mark_x + 8.0,
    );
}

/// The training loss over the steps, with its range on the axes.
fn loss_curve(out: &mut String, losses: &[(u64, f64)]) {
    let points: Vec<(f64, f64)> = losses
        .iter()
        .map(|&(step, loss)| (step as f64, loss))
        .filter(|(_, loss)| loss.is_finite())
        .collect();
    if points.is_empty() {
        out.push_str("<p>No losses were recorded.</p>\n");
        return;
    }
    let (left, right, top, bottom) = (56.0, CHART_WIDTH - CHART_MARGIN, 12.0, 176.0);
    let (first, last) = min_max(points.iter().map(|p| p.0));
    let (low, high) = min_max(points.iter().map(|p| p.1));
    // A flat curve (or a single point) still needs a non-zero span to divide by.
    let scale = |v: f64, lo: f64, hi: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    let at = |(step, loss): (f64, f64)| {
        (
            left + scale(step, first, last) * (right - left),
            bottom - scale(loss, low, high) * (bottom - top),
        )
    };
    put!(
        out,
        "<svg class=\"chart\" id=\"loss-curve\" viewBox=\"0 0 {CHART_WIDTH} 214\" role=\"img\" \
         aria-labelledby=\"loss-curve-title\" font-size=\"14\" \
         font-family=\"system-ui,sans-serif\">\n<title id=\"loss-curve-title\">Training loss \
         per step, from {high} down to {low}</title>\n\
         <polyline points=\"{left},{top} {left},{bottom} {right},{bottom}\" fill=\"none\" \
         stroke=\"#4a525b\"/>\n",
        high = number(high),
        low = number(low)
    );
    if let [point] = points[..] {
        let (x, y) = at(point);
        put!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#3a6ea5\"/>\n"
        );
    } else {
        let line: Vec<String> = points
            .iter()
            .map(|&p| {
                let (x, y) = at(p);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        put!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#3a6ea5\" stroke-width=\"1.5\"/>\n",
            line.join(" ")
        );
    }
    put!(
        out,
        "<text x=\"{label_x}\" y=\"{high_y}\" text-anchor=\"end\">{high}</text>\
         <text x=\"{label_x}\" y=\"{bottom}\" text-anchor=\"end\">{low}</text>\
         <text x=\"{left}\" y=\"{steps_y}\">step {first}</text>\
         <text x=\"{right}\" y=\"{steps_y}\" text-anchor=\"end\">step {last}</text>\
         <text x=\"{middle}\" y=\"{steps_y}\" text-anchor=\"middle\" fill=\"#4a525b\">loss by \
         step</text>\n</svg>\n",
        label_x = left - 6.0,
        high_y = top + 10.0,
        high = number(high),
        low = number(low),
        steps_y = bottom + 22.0,
        middle = (left + right) / 2.0,
    );
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

// ---------------------------------------------------------------------------------------------
// Images.

/// An image ready to embed.
struct Embedded {
    uri: String,
    width: u32,
    height: u32,
}

/// The asset's MIME type, bytes and decoded image, or why it cannot be shown.
fn lookup<'a>(
    assets: &'a ReportAssets,
    name: &str,
) -> Result<(&'a str, &'a [u8], DynamicImage), String> {
    let (mime, bytes) = assets
        .get(name)
        .ok_or_else(|| "not among the report's files".to_owned())?;
    let image = image::load_from_memory(bytes).map_err(|e| format!("cannot be decoded ({e})"))?;
    Ok((mime, bytes, image))
}

fn decode(assets: &ReportAssets, name: &str) -> Result<DynamicImage, String> {
    lookup(assets, name).map(|(_, _, image)| image)
}

/// The image downscaled to at most [`MAX_SIDE`] on its long side.
fn fit(image: DynamicImage) -> DynamicImage {
    if image.width().max(image.height()) <= MAX_SIDE {
        image
    } else {
        image.resize(MAX_SIDE, MAX_SIDE, image::imageops::FilterType::Triangle)
    }
}

fn jpeg(rgb: &RgbImage) -> Embedded {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
        .encode_image(rgb)
        .expect("encoding an RGB image as JPEG into memory cannot fail");
    Embedded {
        uri: data_uri("image/jpeg", &bytes),
        width: rgb.width(),
        height: rgb.height(),
    }
}

/// A small image (a mask, a thumbnail) as a lossless PNG.
fn embedded(image: DynamicImage) -> Embedded {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .expect("encoding an image as PNG into memory cannot fail");
    Embedded {
        uri: data_uri("image/png", &bytes),
        width: image.width(),
        height: image.height(),
    }
}

/// A generated image or attention overlay: its own bytes when it is a small PNG or JPEG that
/// says so, otherwise downscaled and re-encoded.
fn shown_as_is(out: &mut String, assets: &ReportAssets, name: &str, alt: &str) {
    let shown = lookup(assets, name).map(|(mime, bytes, image)| {
        let small = image.width().max(image.height()) <= MAX_SIDE;
        let says_what_it_is = matches!(
            (mime, image::guess_format(bytes)),
            ("image/png", Ok(ImageFormat::Png)) | ("image/jpeg", Ok(ImageFormat::Jpeg))
        );
        if small && says_what_it_is {
            Embedded {
                uri: data_uri(mime, bytes),
                width: image.width(),
                height: image.height(),
            }
        } else {
            jpeg(&fit(image).to_rgb8())
        }
    });
    match shown {
        Ok(shown) => img(out, name, alt, &shown),
        Err(reason) => missing(out, name, alt, &reason),
    }
}

/// The photo with everything outside the subject mask darkened and tinted.
fn overlay(photo: &RgbImage, mask: &GrayImage) -> RgbImage {
    let mask = image::imageops::resize(
        mask,
        photo.width(),
        photo.height(),
        image::imageops::FilterType::Triangle,
    );
    let mut shown = photo.clone();
    for (pixel, subject) in shown.pixels_mut().zip(mask.pixels()) {
        let keep = subject.0[0] as f32 / 255.0;
        let tint = [20.0, 30.0, 70.0];
        for (channel, t) in pixel.0.iter_mut().zip(tint) {
            let dark = *channel as f32 * 0.3 + t;
            *channel = (keep * *channel as f32 + (1.0 - keep) * dark).round() as u8;
        }
    }
    shown
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn img(out: &mut String, name: &str, alt: &str, shown: &Embedded) {
    put!(
        out,
        "<img src=\"{}\" alt=\"{}\" width=\"{}\" height=\"{}\" data-asset=\"{}\">",
        shown.uri,
        esc(alt),
        shown.width,
        shown.height,
        esc(name)
    );
}

fn missing(out: &mut String, name: &str, alt: &str, reason: &str) {
    put!(
        out,
        "<div class=\"missing\" role=\"img\" aria-label=\"{0}\" data-missing=\"{1}\">\
         {0}: {1} {2}.</div>",
        esc(alt),
        esc(name),
        esc(reason)
    );
}

// ---------------------------------------------------------------------------------------------
// Text.

/// `s` safe as HTML text and inside a double- or single-quoted attribute.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn number(v: f64) -> String {
    format!("{v:.3}")
}

fn optional(v: Option<f64>) -> String {
    v.map(number).unwrap_or_else(|| "—".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sidbooth_domain::report::{
        ImageEntry, LeftOut, ModelEntry, Pairs, TrainingEntry, MEASURE_NAMES, REPORT_VERSION,
    };

    fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
        let image = RgbImage::from_pixel(width, height, image::Rgb(rgb));
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(image)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    fn mask_png(width: u32, height: u32) -> Vec<u8> {
        let mask = GrayImage::from_fn(width, height, |x, _| {
            image::Luma([(x < width / 2) as u8 * 255])
        });
        let mut bytes = Vec::new();
        DynamicImage::ImageLuma8(mask)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    fn measures(v: f64) -> MeasureValues {
        MeasureValues {
            clip_i: Some(v),
            dino: None,
            subject_alignment: Some(v),
            non_subject_disentanglement: Some(1.0 - v),
            text_alignment: Some(v / 2.0),
            attention_on_subject: Some(v),
        }
    }

    fn sample() -> (Report, ReportAssets) {
        let image = |name: &str, attention: Option<&str>| ImageEntry {
            name: name.into(),
            seed: Some(7),
            attention: attention.map(Into::into),
            measures: measures(0.6),
        };
        let report = Report {
            version: REPORT_VERSION,
            job_id: Some("job-1".into()),
            created_at: "2026-01-02T03:04:05Z".into(),
            subject_class: "dog".into(),
            token: "sks".into(),
            meaningful: false,
            notices: vec!["Random weights <b>everywhere</b>".into()],
            models: vec![ModelEntry {
                role: "clip".into(),
                name: "tiny-clip".into(),
                random_weights: true,
            }],
            settings: serde_json::json!({"note": "</pre><script>alert(1)</script>"}),
            measures: measures(0.5),
            left_out: vec![LeftOut {
                measure: "dino".into(),
                reason: "no DINO model configured".into(),
            }],
            references: vec![ReferenceEntry {
                name: "00.jpg".into(),
                description: Some("a sks dog & a \"red\" <ball>".into()),
                description_tokens: Some(12),
                description_cut: true,
                mask: Some("masks/00.png".into()),
                mask_source: Some(MaskSource::SamVlmBox),
                mask_coverage: Some(0.25),
            }],
            prompts: vec![PromptEntry {
                prompt: "a sks dog <script>alert('x')</script>".into(),
                text: "a dog <script>alert('x')</script>".into(),
                measures: measures(0.55),
                images: vec![
                    image("images/00-00.png", Some("attention/00-00.png")),
                    image("images/00-01.png", None),
                ],
                pairs: Pairs {
                    references: vec!["00.jpg".into()],
                    images: vec!["images/00-00.png".into(), "images/00-01.png".into()],
                    clip_i: Some(vec![vec![0.5, 0.6]]),
                    ..Pairs::default()
                },
            }],
            training: Some(TrainingEntry {
                method: "lora".into(),
                steps: 3,
                last_loss: Some(0.1),
                losses: vec![(0, 0.3), (1, 0.2), (2, 0.1)],
            }),
            timings: BTreeMap::from([("embedding".into(), 1.5)]),
        };
        let mut assets = ReportAssets::new();
        assets.insert("00.jpg", "image/png", png(800, 600, [200, 120, 40]));
        assets.insert("masks/00.png", "image/png", mask_png(800, 600));
        assets.insert("images/00-00.png", "image/png", png(64, 64, [1, 2, 3]));
        assets.insert("images/00-01.png", "image/png", png(512, 512, [4, 5, 6]));
        assets.insert("attention/00-00.png", "image/png", png(64, 64, [9, 9, 9]));
        (report, assets)
    }

    /// The value of `attribute` in every tag that starts with `tag` (`"<img "`) and has it.
    fn attributes(html: &str, tag: &str, attribute: &str) -> Vec<String> {
        let needle = format!(" {attribute}=\"");
        html.split(tag)
            .skip(1)
            .filter_map(|rest| {
                let head = format!(" {}", &rest[..rest.find('>').unwrap()]);
                let start = head.find(&needle)? + needle.len();
                let len = head[start..].find('"').unwrap();
                Some(head[start..start + len].to_owned())
            })
            .collect()
    }

    #[test]
    fn the_measures_are_described_in_report_order() {
        let names: Vec<&str> = MEASURES.iter().map(|m| m.name).collect();
        assert_eq!(names, MEASURE_NAMES);
    }

    #[test]
    fn user_text_is_escaped() {
        let (report, assets) = sample();
        let html = render(&report, &assets);
        assert!(!html.contains("<script"), "a script tag got through");
        assert!(!html.contains("<ball>") && !html.contains("<b>"));
        assert!(html.contains("a sks dog &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("a sks dog &amp; a &quot;red&quot; &lt;ball&gt;"));
        assert!(html.contains("&lt;/pre&gt;&lt;script&gt;"));
    }

    #[test]
    fn every_image_is_embedded_as_a_data_uri() {
        let (report, assets) = sample();
        let html = render(&report, &assets);
        let sources = attributes(&html, "<img ", "src");
        let names = attributes(&html, "<img ", "data-asset");
        assert_eq!(sources.len(), html.matches("<img ").count());
        assert_eq!(
            names,
            [
                "00.jpg",
                "masks/00.png",
                "images/00-00.png",
                "attention/00-00.png",
                "images/00-01.png"
            ]
        );
        for src in &sources {
            assert!(
                src.starts_with("data:image/png;base64,")
                    || src.starts_with("data:image/jpeg;base64,"),
                "{}",
                &src[..40.min(src.len())]
            );
        }
        for alt in attributes(&html, "<img ", "alt") {
            assert!(!alt.is_empty());
        }
        assert!(!html.contains("class=\"missing\""));
    }

    #[test]
    fn large_images_are_downscaled_and_small_ones_kept() {
        let (report, assets) = sample();
        let html = render(&report, &assets);
        let sizes: Vec<String> = attributes(&html, "<img ", "width")
            .into_iter()
            .zip(attributes(&html, "<img ", "height"))
            .map(|(w, h)| format!("{w}x{h}"))
            .collect();
        // 800x600 photo and mask, 64x64 kept, 512x512 downscaled.
        assert_eq!(sizes, ["384x288", "384x288", "64x64", "64x64", "384x384"]);
        let sources = attributes(&html, "<img ", "src");
        let kept = data_uri("image/png", assets.get("images/00-00.png").unwrap().1);
        assert_eq!(sources[2], kept);
        assert!(sources[0].starts_with("data:image/jpeg;"));
        assert!(sources[4].starts_with("data:image/jpeg;"));
    }

    #[test]
    fn a_missing_or_broken_asset_is_a_text_placeholder() {
        let (report, mut assets) = sample();
        assets.files.remove("attention/00-00.png");
        assets.insert("images/00-01.png", "image/png", b"not a png".to_vec());
        let html = render(&report, &assets);
        let names = attributes(&html, "<img ", "data-asset");
        assert_eq!(names, ["00.jpg", "masks/00.png", "images/00-00.png"]);
        let placeholders = attributes(&html, "<div ", "data-missing");
        assert_eq!(placeholders, ["attention/00-00.png", "images/00-01.png"]);
        assert!(html.contains("attention/00-00.png not among the report&#39;s files."));
        assert!(html.contains("images/00-01.png cannot be decoded"));
    }

    #[test]
    fn a_mask_without_its_photo_is_shown_alone() {
        let (report, mut assets) = sample();
        assets.files.remove("00.jpg");
        let html = render(&report, &assets);
        assert_eq!(attributes(&html, "<div ", "data-missing"), ["00.jpg"]);
        let names = attributes(&html, "<img ", "data-asset");
        let sources = attributes(&html, "<img ", "src");
        assert_eq!(names[0], "masks/00.png");
        assert!(sources[0].starts_with("data:image/png;"));
    }

    #[test]
    fn nothing_is_fetched_from_the_network() {
        let (report, assets) = sample();
        let html = render(&report, &assets);
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("<script") && !html.contains("<link rel=\"stylesheet\""));
        for (at, _) in html.match_indices(" src=\"") {
            assert!(
                html[at..].starts_with(" src=\"data:"),
                "{}",
                &html[at..at + 40]
            );
        }
        assert!(html.contains("default-src 'none'; img-src data:"));
    }

    #[test]
    fn the_summary_lists_every_measure_and_says_why_one_is_left_out() {
        let (report, assets) = sample();
        let html = render(&report, &assets);
        let rows = attributes(&html, "<tr ", "data-measure");
        assert_eq!(rows, MEASURE_NAMES);
        assert!(html.contains(
            "<td class=\"num\">—</td><td class=\"num\">—</td><td class=\"meaning\">\
             <span class=\"note\">Left out: no DINO model configured.</span>"
        ));
        assert!(html.contains("id=\"meaningless-warning\""));
        assert!(html.contains("tiny-clip (clip)"));
        // The bar chart: one bar per computed measure, the paper's three values as marks.
        assert_eq!(html.matches("<rect class=\"bar\"").count(), 5);
        assert_eq!(html.matches("<line class=\"paper-mark\"").count(), 3);
        assert!(html.contains("paper (SID, DreamBooth)"));
        assert!(html.contains("id=\"loss-curve\""));
        assert!(html.contains("Cut: longer than the text encoder reads"));
    }

    #[test]
    fn a_meaningful_report_has_no_warning_and_sections_follow_the_report() {
        let (mut report, assets) = sample();
        report.meaningful = true;
        report.training = None;
        report.notices.clear();
        let html = render(&report, &assets);
        assert!(!html.contains("meaningless-warning"));
        assert!(!html.contains("loss-curve") && !html.contains("id=\"notices\""));
        let order = [
            "<header>",
            "id=\"summary\"",
            "id=\"measures-chart\"",
            "id=\"references\"",
            "class=\"prompt\"",
            "id=\"models\"",
            "id=\"settings\"",
            "id=\"timings\"",
        ];
        let positions: Vec<usize> = order.iter().map(|s| html.find(s).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    }

    #[test]
    fn the_loss_curve_spans_its_axes() {
        let mut out = String::new();
        loss_curve(&mut out, &[(0, 2.0), (10, 1.0), (20, 0.5)]);
        assert!(
            out.contains("points=\"56.0,12.0 233.0,121.3 410.0,176.0\""),
            "{out}"
        );
        assert!(out.contains(">2.000<") && out.contains(">0.500<"));
        assert!(out.contains(">step 0<") && out.contains(">step 20<"));
        let mut flat = String::new();
        loss_curve(&mut flat, &[(5, 1.0)]);
        assert!(flat.contains("<circle cx=\"233.0\" cy=\"94.0\""), "{flat}");
    }
}
