//! The VLM client against the fake OpenAI-compatible server.

use std::collections::HashSet;
use std::io::Cursor;
use std::time::{Duration, Instant};

use clap::Parser;
use sidbooth_describe::fake::{Behaviour, FakeVlm};
use sidbooth_describe::{
    sha256_hex, DescriptionProblem, DescriptionRules, Outcome, VlmArgs, VlmClient, VlmConfig,
    VlmError,
};
use sidbooth_domain::{DescriptionCase, IdentifierToken, Mode, SubjectClass};

const KEY: &str = "test-key-8f2c1d";

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, seed])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn rules(case: DescriptionCase) -> DescriptionRules {
    DescriptionRules::new(
        case,
        Mode::Object,
        IdentifierToken::default(),
        SubjectClass::parse("dog").unwrap(),
    )
}

fn config(fake: &FakeVlm) -> VlmConfig {
    let mut c = VlmConfig::new(fake.base_url()).with_api_key(KEY);
    c.initial_backoff = Duration::from_millis(20);
    c.max_backoff = Duration::from_millis(200);
    c.request_timeout = Duration::from_secs(10);
    c
}

fn client(config: VlmConfig) -> VlmClient {
    VlmClient::new(config).unwrap()
}

const DEFAULT_REPLY: &str =
    "a photo of sks dog sitting in front of an orange wall, with a grey wooden floor beneath.";

fn described_text(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::Described { text, .. } => text,
        other => panic!("expected a description, got {other:?}"),
    }
}

#[tokio::test]
async fn one_request_per_image_with_the_image_and_the_instruction() {
    let fake = FakeVlm::start().await;
    let client = client(config(&fake));
    let r = rules(DescriptionCase::Sid);
    let images = vec![png(1024, 768, 1), png(600, 900, 2), png(300, 200, 3)];

    let mut progress = Vec::new();
    let results = client
        .describe_all(&images, &r, |p| {
            assert!(p.result.is_ok());
            progress.push((p.index, p.done, p.total));
        })
        .await;

    assert_eq!(results.len(), 3);
    for result in &results {
        let outcome = result.as_ref().unwrap();
        assert_eq!(described_text(outcome), DEFAULT_REPLY);
        let Outcome::Described {
            model,
            instruction,
            instruction_version,
            attempts,
            ..
        } = outcome
        else {
            unreachable!()
        };
        assert_eq!(model, "gpt-4o");
        assert_eq!(instruction, &r.instruction().text);
        assert_eq!(*instruction_version, sidbooth_describe::INSTRUCTION_VERSION);
        assert_eq!(*attempts, 1);
    }
    let mut indices: Vec<_> = progress.iter().map(|p| p.0).collect();
    indices.sort();
    assert_eq!(indices, vec![0, 1, 2]);
    assert_eq!(
        progress.iter().map(|p| (p.1, p.2)).collect::<Vec<_>>(),
        vec![(1, 3), (2, 3), (3, 3)]
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    let mut sizes = HashSet::new();
    let mut hashes = HashSet::new();
    for req in &requests {
        assert_eq!(req.path, "/v1/chat/completions");
        assert!(req.typed_ok, "the body is a CreateChatCompletionRequest");
        assert_eq!(req.model, "gpt-4o");
        assert_eq!(req.authorization(), Some(format!("Bearer {KEY}").as_str()));
        assert_eq!(req.instruction, r.instruction().text);
        assert_eq!(req.message_count, 1);
        assert_eq!(req.images.len(), 1);
        let img = &req.images[0];
        assert_eq!(img.mime, "image/jpeg");
        assert_eq!(img.sha256, sha256_hex(&img.bytes));
        let (w, h) = img.dimensions.expect("a decodable JPEG");
        assert!(w <= 512 && h <= 512, "{w}x{h}");
        sizes.insert((w, h));
        hashes.insert(img.sha256.clone());
    }
    assert_eq!(hashes.len(), 3, "each photo sent once");
    assert!(sizes.contains(&(512, 384)), "{sizes:?}");
    assert!(sizes.contains(&(300, 200)), "{sizes:?}");
    assert!(
        sizes
            .iter()
            .any(|&(w, h)| h == 512 && (340..=342).contains(&w)),
        "{sizes:?}"
    );
}

#[tokio::test]
async fn image_max_px_is_configurable() {
    let fake = FakeVlm::start().await;
    let mut c = config(&fake);
    c.image_max_px = 128;
    client(c)
        .describe_one(&png(800, 400, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(fake.requests()[0].images[0].dimensions, Some((128, 64)));
}

#[tokio::test]
async fn rate_limited_with_retry_after_then_success() {
    let fake = FakeVlm::start().await;
    fake.push(Behaviour::RateLimited {
        retry_after_secs: Some(1),
    });
    let client = client(config(&fake));
    let started = Instant::now();
    let outcome = client
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(described_text(&outcome), DEFAULT_REPLY);
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(elapsed >= Duration::from_millis(990), "{elapsed:?}");
    let gap = requests[1].received_at - requests[0].received_at;
    assert!(gap >= Duration::from_millis(990), "{gap:?}");
    // The retry is the same request.
    assert_eq!(requests[0].body, requests[1].body);
}

#[tokio::test]
async fn rate_limited_until_retries_run_out() {
    let fake = FakeVlm::start().await;
    fake.push_all((0..3).map(|_| Behaviour::RateLimited {
        retry_after_secs: None,
    }));
    let mut c = config(&fake);
    c.max_retries = 2;
    let err = client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert_eq!(err, VlmError::RateLimited { attempts: 3 });
    assert!(err.is_transient());
    assert_eq!(fake.requests().len(), 3);
    assert!(!err.to_string().contains(KEY));
}

#[tokio::test]
async fn server_error_then_success() {
    let fake = FakeVlm::start().await;
    fake.push(Behaviour::server_error());
    let outcome = client(config(&fake))
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(described_text(&outcome), DEFAULT_REPLY);
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn server_errors_until_retries_run_out() {
    let fake = FakeVlm::start().await;
    fake.push_all([Behaviour::Status(503), Behaviour::Status(502)]);
    let mut c = config(&fake);
    c.max_retries = 1;
    let err = client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert!(
        matches!(err, VlmError::Server { status: 502, attempts: 2, ref message } if message == "scripted failure"),
        "{err:?}"
    );
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn malformed_json_is_retried() {
    let fake = FakeVlm::start().await;
    fake.push(Behaviour::MalformedJson);
    let outcome = client(config(&fake))
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(described_text(&outcome), DEFAULT_REPLY);
    assert_eq!(fake.requests().len(), 2);

    fake.push_all([Behaviour::MalformedJson, Behaviour::MalformedJson]);
    let mut c = config(&fake);
    c.max_retries = 1;
    let err = client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert!(
        matches!(err, VlmError::BadResponse { attempts: 2, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_errors_are_not_retried_and_never_show_the_key() {
    let fake = FakeVlm::start().await;
    fake.push(Behaviour::Status(401));
    let err = client(config(&fake))
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        VlmError::Rejected {
            status: 401,
            message: "scripted failure".into()
        }
    );
    assert!(!err.is_transient());
    assert_eq!(fake.requests().len(), 1);
    assert!(!format!("{err} {err:?}").contains(KEY));
}

#[tokio::test]
async fn connection_refused_is_a_connection_error() {
    let fake = FakeVlm::start().await;
    let base = fake.base_url();
    drop(fake);
    // Give the aborted server a moment to close its listener.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c = VlmConfig::new(base).with_api_key(KEY);
    c.max_retries = 1;
    c.initial_backoff = Duration::from_millis(10);
    let err = client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert!(
        matches!(err, VlmError::Connection { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains(KEY));
}

#[tokio::test]
async fn an_invalid_answer_is_corrected_by_a_follow_up() {
    let fake = FakeVlm::start().await;
    let bad = "A brown dog sitting on a sofa.";
    fake.push(Behaviour::reply(bad));
    let outcome = client(config(&fake))
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(described_text(&outcome), DEFAULT_REPLY);
    assert!(matches!(outcome, Outcome::Described { attempts: 2, .. }));

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let follow_up = &requests[1];
    assert_eq!(
        follow_up.message_count, 3,
        "instruction, bad answer, correction"
    );
    assert_eq!(
        follow_up.images.len(),
        1,
        "the photo is still part of the conversation"
    );
    assert_eq!(follow_up.texts[1], bad);
    let correction = &follow_up.texts[2];
    assert!(
        correction.contains("must start with \"a photo of sks dog\""),
        "{correction}"
    );
    assert_eq!(follow_up.body["messages"][1]["role"], "assistant");
}

#[tokio::test]
async fn an_answer_longer_than_the_text_encoder_reads_is_shortened() {
    let fake = FakeVlm::start().await;
    let long = format!(
        "a photo of sks dog sitting on a sofa beside {}. The wall behind has {}.",
        [
            "a lamp", "a cup", "a book", "a plant", "a vase", "a clock", "a pen", "a box", "a hat",
            "a bag", "a fan"
        ]
        .join(", "),
        [
            "a map",
            "a mirror",
            "a shelf",
            "a frame",
            "a poster",
            "a calendar",
            "a switch",
            "a socket",
            "a hook",
            "a rug",
            "a chair",
            "a desk",
            "a radio"
        ]
        .join(", ")
    );
    fake.push(Behaviour::reply(long.clone()));
    let outcome = client(config(&fake))
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(described_text(&outcome), DEFAULT_REPLY);
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[0].instruction.contains("at most 50 words"));
    let correction = &requests[1].texts[2];
    assert!(correction.contains("CLIP tokens"), "{correction}");
    assert!(correction.contains("shorten it"), "{correction}");
}

#[tokio::test]
async fn the_subject_box_is_asked_as_json_and_checked() {
    let fake = FakeVlm::start().await;
    fake.push_box(Behaviour::reply("The dog is in the middle."));
    fake.push_box(Behaviour::reply(r#"{"box": [0.1, 0.2, 0.6, 0.9]}"#));
    let outcome = client(config(&fake))
        .subject_box(&png(64, 64, 0), &SubjectClass::parse("dog").unwrap())
        .await
        .unwrap();
    let sidbooth_describe::BoxOutcome::Found(b) = outcome else {
        panic!("expected a box, got {outcome:?}");
    };
    assert_eq!(b.to_pixels(100, 50), [10.0, 10.0, 60.0, 45.0]);
    let requests = fake.requests();
    assert_eq!(
        requests.len(),
        2,
        "one correction after the answer that is not JSON"
    );
    assert_eq!(requests[0].images.len(), 1);
    assert!(
        requests[1].texts[2].contains("JSON only"),
        "{:?}",
        requests[1].texts
    );

    fake.push_box(Behaviour::reply(r#"{"box": null}"#));
    let none = client(config(&fake))
        .subject_box(&png(64, 64, 0), &SubjectClass::parse("dog").unwrap())
        .await
        .unwrap();
    assert_eq!(none, sidbooth_describe::BoxOutcome::NotFound);
    // Descriptions are not disturbed by box answers queued for the same server.
    let described = client(config(&fake))
        .describe_one(&png(64, 64, 1), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(described_text(&described), DEFAULT_REPLY);
}

#[tokio::test]
async fn an_answer_that_keeps_failing_is_a_problem() {
    let fake = FakeVlm::start().await;
    let bad = "a photo of sks dog with fluffy white fur on a sofa.";
    fake.push_all((0..3).map(|_| Behaviour::reply(bad)));
    let outcome = client(config(&fake))
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    match outcome {
        Outcome::Problem {
            last_text,
            problem,
            attempts,
        } => {
            assert_eq!(last_text.as_deref(), Some(bad));
            assert_eq!(problem.code(), "describes_subject");
            assert_eq!(attempts, 3);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(fake.pending(), 0);
    assert!(fake.requests()[2]
        .texts
        .last()
        .unwrap()
        .contains("must not describe the sks dog itself"));
}

#[tokio::test]
async fn empty_content_counts_as_an_empty_description() {
    let fake = FakeVlm::start().await;
    fake.push_all([Behaviour::EmptyContent, Behaviour::EmptyContent]);
    let mut c = config(&fake);
    c.max_corrections = 1;
    let outcome = client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Problem {
            last_text: None,
            problem: DescriptionProblem::Empty {
                prefix: "a photo of sks dog".into()
            },
            attempts: 2,
        }
    );
}

#[tokio::test]
async fn concurrency_limit_is_respected() {
    let fake = FakeVlm::start().await;
    fake.set_base_delay(Duration::from_millis(250));
    let mut c = config(&fake);
    c.concurrency = 2;
    let client = client(c);
    let images: Vec<Vec<u8>> = (0..6).map(|i| png(64, 64, i)).collect();
    let started = Instant::now();
    let results = client
        .describe_all(&images, &rules(DescriptionCase::Sid), |_| {})
        .await;
    assert!(results.iter().all(|r| r.is_ok()));
    assert_eq!(fake.requests().len(), 6);
    assert_eq!(fake.max_in_flight(), 2);
    assert!(started.elapsed() >= Duration::from_millis(3 * 250 - 10));
}

#[tokio::test]
async fn requests_run_in_parallel_up_to_the_limit() {
    let fake = FakeVlm::start().await;
    fake.set_base_delay(Duration::from_millis(300));
    let mut c = config(&fake);
    c.concurrency = 4;
    let images: Vec<Vec<u8>> = (0..4).map(|i| png(64, 64, i)).collect();
    client(c)
        .describe_all(&images, &rules(DescriptionCase::Sid), |_| {})
        .await;
    assert_eq!(fake.max_in_flight(), 4);
}

#[tokio::test]
async fn timeouts_are_retried_then_reported() {
    let fake = FakeVlm::start().await;
    fake.push(Behaviour::delayed(
        Duration::from_secs(3),
        Behaviour::Default,
    ));
    let mut c = config(&fake);
    c.request_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let outcome = client(c.clone())
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(described_text(&outcome), DEFAULT_REPLY);
    assert_eq!(fake.requests().len(), 2);
    assert!(started.elapsed() < Duration::from_secs(2));

    fake.push_all((0..2).map(|_| Behaviour::delayed(Duration::from_secs(3), Behaviour::Default)));
    c.max_retries = 1;
    let started = Instant::now();
    let err = client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        VlmError::Timeout {
            timeout: Duration::from_millis(300),
            attempts: 2
        }
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn class_only_asks_no_model() {
    let fake = FakeVlm::start().await;
    let outcome = client(config(&fake))
        .describe_one(b"not even an image", &rules(DescriptionCase::ClassOnly))
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        Outcome::Described { ref text, attempts: 0, .. } if text == "a photo of sks dog"
    ));
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn an_unreadable_photo_is_an_error_without_a_request() {
    let fake = FakeVlm::start().await;
    let err = client(config(&fake))
        .describe_one(b"not an image", &rules(DescriptionCase::Sid))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "vlm_photo");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn style_mode_end_to_end() {
    let fake = FakeVlm::start().await;
    let r = DescriptionRules::new(
        DescriptionCase::Sid,
        Mode::Style,
        IdentifierToken::default(),
        SubjectClass::parse("art").unwrap(),
    );
    let outcome = client(config(&fake))
        .describe_one(&png(64, 64, 0), &r)
        .await
        .unwrap();
    assert_eq!(
        described_text(&outcome),
        "a painting in the style of sks art showing a harbour with three fishing boats under a cloudy sky."
    );
    assert!(fake.requests()[0]
        .instruction
        .contains("Never describe the style"));
}

#[tokio::test]
async fn no_authorization_header_without_a_key() {
    let fake = FakeVlm::start().await;
    let mut c = config(&fake);
    c.api_key = None;
    client(c)
        .describe_one(&png(64, 64, 0), &rules(DescriptionCase::Sid))
        .await
        .unwrap();
    assert_eq!(fake.requests()[0].authorization(), None);
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    vlm: VlmArgs,
}

#[test]
fn vlm_args_map_to_a_config() {
    let cli = Cli::try_parse_from([
        "x",
        "--vlm-base-url",
        "http://127.0.0.1:9/v1",
        "--vlm-api-key",
        KEY,
        "--vlm-model",
        "llava",
        "--vlm-concurrency",
        "2",
    ])
    .unwrap();
    let c = cli.vlm.config().unwrap();
    assert_eq!(c.base_url, "http://127.0.0.1:9/v1");
    assert_eq!(c.api_key.as_ref().unwrap().expose(), KEY);
    assert_eq!(c.model, "llava");
    assert_eq!(c.concurrency, 2);
    assert_eq!(c.image_max_px, 512);
    assert!(!format!("{:?}", cli.vlm).contains(KEY));

    let only_key = Cli::try_parse_from(["x", "--vlm-api-key", KEY]).unwrap();
    assert_eq!(
        only_key.vlm.config().unwrap().base_url,
        sidbooth_describe::client::DEFAULT_BASE_URL
    );
    assert_eq!(only_key.vlm.config().unwrap().model, "gpt-4o");
}
