//! One worker thread per model owns its ONNX Runtime session and serves a bounded
//! queue: it takes the first waiting request, gathers up to `max_batch` more for at
//! most `batch_wait`, runs them as one batch and answers each through its oneshot
//! channel. A full queue is refused at once (the caller answers 503), so memory stays
//! bounded and no accepted request is dropped: every job taken gets an answer, and on
//! shutdown the worker drains what is queued before it exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ort::session::Session;
use tokio::sync::oneshot;

use super::runtime::run_probabilities;

/// The answer to one job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// [P(NORMAL), P(PNEUMONIA)].
    pub probabilities: [f32; 2],
    /// Time spent waiting in the queue.
    pub queued: Duration,
    /// Time the batch took in ONNX Runtime.
    pub inference: Duration,
    /// Size of the batch it ran in.
    pub batch_size: usize,
}

struct Job {
    input: Vec<f32>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<JobOutput, String>>,
}

/// Why a job was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: retry later.
    Full,
    /// The worker has stopped (shutting down).
    Closed,
}

/// Observes batches (metrics), called on the worker thread.
pub trait BatchObserver: Send + Sync + 'static {
    /// A batch of `size` ran in `inference`; its jobs waited `queued` each.
    fn batch(&self, size: usize, inference: Duration, queued: &[Duration]);
    /// The queue now holds `depth` jobs.
    fn depth(&self, depth: usize);
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait for more jobs after the first.
    pub batch_wait: Duration,
    /// Queue capacity (jobs waiting beyond the running batch).
    pub capacity: usize,
}

/// The sending side: cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    input_len: usize,
    observer: Arc<dyn BatchObserver>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("depth", &self.depth())
            .finish()
    }
}

impl Batcher {
    /// Starts the worker thread that owns `session`. Inputs are `[3, s, s]` tensors.
    pub fn spawn(
        name: &str,
        session: Session,
        input_size: usize,
        cfg: BatchConfig,
        observer: Arc<dyn BatchObserver>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = sync_channel(cfg.capacity.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let worker_depth = depth.clone();
        let worker_observer = observer.clone();
        let handle = std::thread::Builder::new()
            .name(format!("cxr-infer-{name}"))
            .spawn(move || worker(session, rx, input_size, cfg, worker_depth, worker_observer))
            .expect("the OS can start a worker thread");
        (
            Self {
                tx,
                depth,
                input_len: 3 * input_size * input_size,
                observer,
            },
            handle,
        )
    }

    /// Queues one `[3, s, s]` input; the receiver yields its answer.
    pub fn submit(
        &self,
        input: Vec<f32>,
    ) -> Result<oneshot::Receiver<Result<JobOutput, String>>, SubmitError> {
        assert_eq!(
            input.len(),
            self.input_len,
            "input tensor matches the model's input size"
        );
        let (reply, rx) = oneshot::channel();
        // Count before sending so the worker never decrements below zero.
        let d = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
        match self.tx.try_send(Job {
            input,
            enqueued: Instant::now(),
            reply,
        }) {
            Ok(()) => {
                self.observer.depth(d);
                Ok(rx)
            }
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full,
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Jobs waiting or running.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

fn worker(
    mut session: Session,
    rx: Receiver<Job>,
    s: usize,
    cfg: BatchConfig,
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn BatchObserver>,
) {
    // `recv` fails only when every sender is gone and the queue is empty: then the
    // queue is drained and the worker ends.
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + cfg.batch_wait;
        while jobs.len() < cfg.max_batch {
            let now = Instant::now();
            if now >= deadline {
                // Take what is already there without waiting.
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
                continue;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let n = jobs.len();
        let start = Instant::now();
        let queued: Vec<Duration> = jobs.iter().map(|j| start - j.enqueued).collect();
        let mut batch = Vec::with_capacity(n * 3 * s * s);
        let mut replies = Vec::with_capacity(n);
        for j in jobs {
            batch.extend_from_slice(&j.input);
            replies.push(j.reply);
        }
        let result = run_probabilities(&mut session, batch, n, s);
        let inference = start.elapsed();
        let left = depth.fetch_sub(n, Ordering::SeqCst) - n;
        observer.depth(left);
        observer.batch(n, inference, &queued);
        match result {
            Ok(probs) => {
                for ((reply, p), q) in replies.into_iter().zip(probs).zip(&queued) {
                    // The caller may have gone (client disconnected): nothing to do then.
                    let _ = reply.send(Ok(JobOutput {
                        probabilities: p,
                        queued: *q,
                        inference,
                        batch_size: n,
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = n, "inference failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
