//! Cross-request batching with distinct images: concurrent requests are run in one
//! batch (the batch-size histogram says so), and each answer is that image's own (it
//! equals the image's answer run alone, and differs from the others'), so a batch row
//! answering the wrong request cannot pass.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::http::{get, json, raw, send};
use cxr::inference::BatchConfig;

fn probs(v: &serde_json::Value) -> [f64; 2] {
    [
        v["probabilities"]["NORMAL"].as_f64().unwrap(),
        v["probabilities"]["PNEUMONIA"].as_f64().unwrap(),
    ]
}

/// The whole line of a Prometheus sample's value.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_row_of_a_batch_answers_its_own_request() {
    let images: Vec<Vec<u8>> = (0..6)
        .map(|i| common::png_bytes(&common::gray_image(48, 40, 11 * i + 1)))
        .collect();
    // Alone: one at a time, batches of one.
    let solo = common::test_app_with(
        common::test_limits(),
        BatchConfig {
            max_batch: 1,
            batch_wait: Duration::ZERO,
            capacity: 64,
        },
    );
    let mut alone = Vec::new();
    for img in &images {
        let (s, _, b) = send(&solo.app, raw("/predict", "image/png", img.clone())).await;
        assert_eq!(s, StatusCode::OK);
        alone.push(probs(&json(&b)));
    }
    // The images differ enough for a swap to show.
    for i in 0..alone.len() {
        for j in i + 1..alone.len() {
            assert!(
                (alone[i][1] - alone[j][1]).abs() > 1e-4,
                "images {i} and {j} answer alike: {:?} {:?}",
                alone[i],
                alone[j]
            );
        }
    }

    // Together: a long batch wait, so the concurrent requests share batches.
    let t = common::test_app_with(
        common::test_limits(),
        BatchConfig {
            max_batch: 8,
            batch_wait: Duration::from_millis(300),
            capacity: 64,
        },
    );
    let tasks: Vec<_> = images
        .iter()
        .map(|img| {
            let app = t.app.clone();
            let img = img.clone();
            tokio::spawn(async move { send(&app, raw("/predict", "image/png", img)).await })
        })
        .collect();
    let mut together = Vec::new();
    for task in tasks {
        let (s, _, b) = task.await.unwrap();
        assert_eq!(s, StatusCode::OK);
        together.push(probs(&json(&b)));
    }
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(
            (a[0] - b[0]).abs() < 1e-5 && (a[1] - b[1]).abs() < 1e-5,
            "image {i}: alone {a:?}, in a batch {b:?}"
        );
    }
    let (_, _, b) = send(&t.app, get("/metrics")).await;
    let text = String::from_utf8_lossy(&b);
    let count = sample(&text, r#"cxr_batch_size_count{model="alpha"}"#);
    let sum = sample(&text, r#"cxr_batch_size_sum{model="alpha"}"#);
    let ones = sample(&text, r#"cxr_batch_size_bucket{model="alpha",le="1"}"#);
    assert_eq!(sum, 6.0, "six images ran");
    assert!(
        count < 6.0 && ones < count,
        "no batch of more than one: {count} batches\n{text}"
    );
}
