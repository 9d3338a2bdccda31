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
            arrival_wait: Duration::ZERO,
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
            arrival_wait: Duration::ZERO,
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

/// A backend that answers P(PNEUMONIA) = the first value of each input, records the
/// batch sizes it ran, and can fail or stall.
struct Fake {
    batches: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    fail: bool,
    stall: Duration,
}

impl cxr::inference::Backend for Fake {
    fn run(
        &mut self,
        batch: Vec<f32>,
        n: usize,
        s: usize,
    ) -> Result<Vec<cxr::inference::ModelOutput>, cxr::inference::RunError> {
        std::thread::sleep(self.stall);
        self.batches.lock().unwrap().push(n);
        if self.fail {
            return Err(cxr::inference::RunError::Runtime(
                "the fake backend fails".into(),
            ));
        }
        Ok(batch
            .chunks(3 * s * s)
            .map(|x| cxr::inference::ModelOutput {
                logits: [0.0, 0.0],
                probabilities: [1.0 - x[0], x[0]],
                cam: None,
                embedding: None,
            })
            .collect())
    }
}

fn fake(fail: bool, stall: Duration, capacity: usize) -> (cxr::inference::Batcher, Fake) {
    let cfg = BatchConfig {
        max_batch: 8,
        batch_wait: Duration::from_millis(200),
        arrival_wait: Duration::ZERO,
        capacity,
    };
    fake_with(fail, stall, cfg)
}

fn fake_with(fail: bool, stall: Duration, cfg: BatchConfig) -> (cxr::inference::Batcher, Fake) {
    let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Fake {
        batches: batches.clone(),
        fail,
        stall,
    };
    struct Quiet;
    impl cxr::inference::BatchObserver for Quiet {
        fn batch(&self, _: usize, _: Duration, _: &[Duration]) {}
        fn depth(&self, _: usize) {}
    }
    let (b, _handle) =
        cxr::inference::Batcher::spawn("fake", backend, 2, cfg, std::sync::Arc::new(Quiet));
    let probe = Fake {
        batches,
        fail,
        stall,
    };
    (b, probe)
}

/// Batches of up to 8, formed at once, that wait up to 3 s for announced jobs.
fn waiting_for_arrivals(capacity: usize) -> BatchConfig {
    BatchConfig {
        max_batch: 8,
        batch_wait: Duration::ZERO,
        arrival_wait: Duration::from_secs(3),
        capacity,
    }
}

/// A batch that is not full waits for requests announced as on their way (being
/// decoded), so a burst runs as one batch; a lone request, and one whose announced
/// companion never comes (its decode failed), do not wait out `arrival_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_requests_join_the_batch_and_nobody_waits_for_nothing() {
    use std::time::Instant;
    let input = |v: f32| vec![v; 3 * 2 * 2];
    let cfg = waiting_for_arrivals(16);
    // Two announced, one queued: the batch waits for the second, then runs both.
    let (b, probe) = fake_with(false, Duration::ZERO, cfg);
    let second = b.announce();
    let third = b.announce();
    assert_eq!(b.arriving(), 2);
    let first = b.submit(input(0.1)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        probe.batches.lock().unwrap().is_empty(),
        "ran before the announced arrived"
    );
    let two = b.submit(input(0.2)).unwrap();
    drop(second);
    // The third's decode failed: its announcement is withdrawn, the batch goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    drop(third);
    assert_eq!(b.arriving(), 0);
    let (a, c) = (first.await.unwrap().unwrap(), two.await.unwrap().unwrap());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "waited out arrival_wait: {:?}",
        t.elapsed()
    );
    assert_eq!((a.batch_size, c.batch_size), (2, 2));
    assert_eq!(*probe.batches.lock().unwrap(), vec![2]);

    // Alone, nothing announced: no wait.
    let t = Instant::now();
    let out = b.submit(input(0.3)).unwrap().await.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a lone request waited {:?}",
        t.elapsed()
    );
    assert_eq!(out.batch_size, 1);

    // Announced but never coming: the wait ends at arrival_wait, not later.
    let cfg = BatchConfig {
        arrival_wait: Duration::from_millis(400),
        ..cfg
    };
    let (b, _) = fake_with(false, Duration::ZERO, cfg);
    let _stuck = b.announce();
    let t = Instant::now();
    let out = b.submit(input(0.4)).unwrap().await.unwrap().unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(2),
        "waited {waited:?} for a request that never came (arrival_wait 400 ms)"
    );
    assert_eq!(out.batch_size, 1);
}

/// A job's announcement travels with it and is withdrawn when the worker takes it:
/// the batch it starts never waits for its own job (the handler used to withdraw it
/// right after queueing, and a worker that woke in between waited one poll, 0.5 ms,
/// or all of `arrival_wait` where the handler was slow to withdraw). A refused job
/// withdraws its announcement at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_own_announcement_never_holds_its_batch() {
    use std::time::Instant;
    let input = |v: f32| vec![v; 3 * 2 * 2];
    let cfg = waiting_for_arrivals(1);
    let (b, probe) = fake_with(false, Duration::from_millis(300), cfg);
    let t = Instant::now();
    let first = b.submit_announced(input(0.1), Some(b.announce())).unwrap();
    let out = first.await.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the batch waited for its own job: {:?}",
        t.elapsed()
    );
    assert_eq!(out.batch_size, 1);
    assert_eq!(b.arriving(), 0);
    // A running batch (300 ms) and a full queue (capacity 1): the third is refused,
    // and its announcement goes with it.
    let running = b.submit(input(0.2)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = b.submit_announced(input(0.3), Some(b.announce())).unwrap();
    assert_eq!(b.arriving(), 1, "queued, not yet taken");
    let refused = b.submit_announced(input(0.4), Some(b.announce()));
    assert!(refused.is_err());
    assert_eq!(
        b.arriving(),
        1,
        "the refused job's announcement is withdrawn"
    );
    running.await.unwrap().unwrap();
    queued.await.unwrap().unwrap();
    assert_eq!(b.arriving(), 0);
    assert_eq!(*probe.batches.lock().unwrap(), vec![1, 1, 1]);
}

/// The inference facade on a fake backend: one call queues every input before
/// awaiting any (they run as one batch) and answers each in its own order; a failed
/// run and a full queue come back as their `InferError`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facade_batches_a_requests_inputs_and_keeps_their_order() {
    use cxr::inference::{InferError, classify_on};
    let input = |v: f32| vec![v; 3 * 2 * 2];
    let (b, probe) = fake(false, Duration::ZERO, 16);
    let out = classify_on(&b, "fake", vec![input(0.1), input(0.7), input(0.4)])
        .await
        .unwrap();
    let p: Vec<f32> = out.iter().map(|o| o.probabilities[1]).collect();
    assert_eq!(p, vec![0.1, 0.7, 0.4]);
    assert!(out.iter().all(|o| o.batch_size == 3));
    assert_eq!(*probe.batches.lock().unwrap(), vec![3]);

    let (b, _) = fake(true, Duration::ZERO, 16);
    let e = classify_on(&b, "fake", vec![input(0.5)]).await.unwrap_err();
    assert_eq!(
        e,
        InferError::Failed(cxr::inference::RunError::Runtime(
            "the fake backend fails".into()
        ))
    );

    // A stalled worker holding one batch, a queue of 2: the fourth input is refused.
    let (b, _) = fake(false, Duration::from_millis(800), 2);
    let first = b.submit(input(0.5)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the worker took it
    let e = classify_on(&b, "fake", vec![input(0.1), input(0.2), input(0.3)])
        .await
        .unwrap_err();
    assert_eq!(e, InferError::Overloaded("fake".into()));
    assert!(first.await.unwrap().is_ok());
}

/// The handler announces a request to its model's batcher while the request decodes:
/// a small image that is ready while a large one (sent first) still decodes waits
/// for it, and the two run as one batch rather than one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_still_decoding_is_waited_for() {
    let t = common::test_app_with(
        common::test_limits(),
        BatchConfig {
            max_batch: 8,
            batch_wait: Duration::ZERO,
            arrival_wait: Duration::from_secs(20),
            capacity: 64,
        },
    );
    // About 20 megapixels: its decode and resize take far longer than the small one's.
    let large = common::png_bytes(&common::gray_image(5000, 4000, 3));
    let small = common::png_bytes(&common::gray_image(48, 40, 1));
    let app = t.app.clone();
    let first = tokio::spawn(async move { send(&app, raw("/predict", "image/png", large)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (s, _, b) = send(&t.app, raw("/predict", "image/png", small)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) = first.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert!(json(&b)["timings_ms"].is_object());
    let (_, _, m) = send(&t.app, get("/metrics")).await;
    let text = String::from_utf8_lossy(&m);
    let count = sample(&text, r#"cxr_batch_size_count{model="alpha"}"#);
    let sum = sample(&text, r#"cxr_batch_size_sum{model="alpha"}"#);
    assert_eq!(
        (count, sum),
        (1.0, 2.0),
        "the two did not run as one batch\n{text}"
    );
}
