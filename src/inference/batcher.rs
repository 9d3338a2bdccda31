//! One worker thread per model owns its ONNX Runtime session and serves a bounded
//! queue: it takes the first waiting request, gathers up to `max_batch` more for at
//! most `batch_wait`, and, while requests announced to it ([`Batcher::announce`]:
//! being decoded) are still on their way, waits up to `arrival_wait` for them; then
//! it runs them as one batch and answers each through its oneshot channel. A full
//! queue is refused at once (the caller answers 503), so memory stays bounded and no
//! accepted request is dropped: every job taken gets an answer, and on shutdown the
//! worker drains what is queued before it exits.
//!
//! A job whose caller has gone (client disconnected, request timed out) is skipped
//! when its batch is formed, not run. A worker that panics is restarted on the same
//! queue with a fresh session; until it is back, [`Batcher::is_alive`] says no (the
//! service answers `/ready` 503), and the jobs of the batch it died on are answered
//! with an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use super::backend::{Backend, SessionFactory};
use super::runtime::{ModelOutput, RunError};

/// The answer to one job.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// [P(NORMAL), P(PNEUMONIA)], the model file's own output.
    pub probabilities: [f32; 2],
    /// The logits they came from (what a card's temperature applies to).
    pub logits: [f32; 2],
    /// Time spent waiting in the queue.
    pub queued: Duration,
    /// Time the batch took in ONNX Runtime.
    pub inference: Duration,
    /// Size of the batch it ran in.
    pub batch_size: usize,
    /// Class activation maps, when the model has them.
    pub cam: Option<super::ClassMaps>,
    /// The pooled features, when the model has them (what the OOD score reads).
    pub embedding: Option<Vec<f32>>,
}

/// Where a job's answer goes.
type Reply = oneshot::Sender<Result<JobOutput, RunError>>;

/// One queued input and where its answer goes.
struct Job {
    input: Vec<f32>,
    enqueued: Instant,
    reply: Reply,
    /// Its announcement, withdrawn by the worker when it takes the job: the count a
    /// forming batch waits on is then never the batch's own jobs.
    arrival: Option<Arrival>,
}

impl Job {
    /// The job, taken by the worker: its announcement is withdrawn.
    fn taken(mut self) -> Self {
        self.arrival = None;
        self
    }
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
    /// `n` queued jobs were skipped: nobody waited for their answer any more.
    fn abandoned(&self, _n: usize) {}
    /// The worker died (panicked) and is being restarted.
    fn restarted(&self) {}
}

/// Batching settings.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait for more jobs after the first.
    pub batch_wait: Duration,
    /// Longest wait for announced jobs (requests being decoded for this model) to
    /// join a batch that is not full. Under a closed loop of clients the answers of
    /// one batch come back as one burst of requests; without it the first of them
    /// runs alone and the rest wait for it, and a batch of one is the dearest per
    /// image. A lone request has nothing announced behind it and never waits.
    pub arrival_wait: Duration,
    /// Queue capacity (jobs waiting beyond the running batch).
    pub capacity: usize,
}

/// The sending side: cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    input_len: usize,
    observer: Arc<dyn BatchObserver>,
    alive: Arc<AtomicBool>,
    fault: Arc<AtomicBool>,
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
    /// A worker that panics is not restarted (see [`Batcher::spawn_restarting`]).
    pub fn spawn(
        name: &str,
        session: impl Backend,
        input_size: usize,
        cfg: BatchConfig,
        observer: Arc<dyn BatchObserver>,
    ) -> (Self, JoinHandle<()>) {
        Self::spawn_restarting(name, session, None, input_size, cfg, observer)
    }

    /// Starts the worker thread that owns `session`; if it panics, `restart` makes a
    /// fresh session and the worker goes on serving the same queue.
    pub fn spawn_restarting(
        name: &str,
        session: impl Backend,
        restart: Option<SessionFactory>,
        input_size: usize,
        cfg: BatchConfig,
        observer: Arc<dyn BatchObserver>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = sync_channel(cfg.capacity.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let arriving = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let fault = Arc::new(AtomicBool::new(false));
        let ctx = WorkerCtx {
            rx,
            s: input_size,
            cfg,
            depth: depth.clone(),
            arriving: arriving.clone(),
            observer: observer.clone(),
            fault: fault.clone(),
        };
        let worker_alive = alive.clone();
        let model = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("cxr-infer-{name}"))
            .spawn(move || supervise(&model, Box::new(session), restart, &ctx, &worker_alive))
            .expect("the OS can start a worker thread");
        (
            Self {
                tx,
                depth,
                arriving,
                input_len: 3 * input_size * input_size,
                observer,
                alive,
                fault,
            },
            handle,
        )
    }

    /// Whether the worker is running (false while a dead one is being restarted, or
    /// for good when it cannot be).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Fault injection for tests: the worker panics before running its next batch.
    #[doc(hidden)]
    pub fn inject_panic(&self) {
        self.fault.store(true, Ordering::SeqCst);
    }

    /// Queues one `[3, s, s]` input; the receiver yields its answer.
    pub fn submit(
        &self,
        input: Vec<f32>,
    ) -> Result<oneshot::Receiver<Result<JobOutput, RunError>>, SubmitError> {
        self.submit_announced(input, None)
    }

    /// [`Batcher::submit`] for a job announced with [`Batcher::announce`]: the
    /// announcement travels with it and is withdrawn when the worker takes the job
    /// (or at once, when the job is refused). Withdrawing it any earlier would let a
    /// batch start without the job; any later, and the worker would wait for a job it
    /// already holds.
    pub fn submit_announced(
        &self,
        input: Vec<f32>,
        arrival: Option<Arrival>,
    ) -> Result<oneshot::Receiver<Result<JobOutput, RunError>>, SubmitError> {
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
            arrival,
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

    /// Announces a job on its way (its request is being decoded): until the
    /// [`Arrival`] is dropped (it travels with the job into the queue, see
    /// [`Batcher::submit_announced`], and is dropped when the worker takes the job or
    /// when the caller gives up), a batch that is not full waits up to
    /// `arrival_wait` for it.
    pub fn announce(&self) -> Arrival {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arrival(self.arriving.clone())
    }

    /// Jobs announced and not yet taken by the worker.
    pub fn arriving(&self) -> usize {
        self.arriving.load(Ordering::SeqCst)
    }
}

/// A job announced to a [`Batcher`]; dropping it withdraws the announcement.
#[derive(Debug)]
pub struct Arrival(Arc<AtomicUsize>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct WorkerCtx {
    rx: Receiver<Job>,
    s: usize,
    cfg: BatchConfig,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    observer: Arc<dyn BatchObserver>,
    fault: Arc<AtomicBool>,
}

/// The first wait before a dead worker's new session (doubled, up to 5 s, while it
/// keeps dying within a minute).
const RESTART_BACKOFF: Duration = Duration::from_millis(250);

/// Runs the worker; restarts it with a fresh session when it panics.
fn supervise(
    model: &str,
    session: Box<dyn Backend>,
    restart: Option<SessionFactory>,
    ctx: &WorkerCtx,
    alive: &AtomicBool,
) {
    let mut session = Some(session);
    let mut backoff = RESTART_BACKOFF;
    let mut restarted_at: Option<Instant> = None;
    loop {
        let s = match session.take() {
            Some(s) => s,
            None => match restart.as_ref().map(|f| f()) {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::error!(model, error = %e, "cannot restart the inference worker; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                None => {
                    tracing::error!(model, "the inference worker died and is not restarted");
                    return;
                }
            },
        };
        alive.store(true, Ordering::SeqCst);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker(s, ctx, alive)));
        match run {
            // The queue closed and is drained: shutdown.
            Ok(()) => return,
            Err(_) => {
                alive.store(false, Ordering::SeqCst);
                ctx.observer.restarted();
                tracing::error!(
                    model,
                    "the inference worker panicked; restarting it with a fresh session"
                );
                // Back off before the new session, doubling while it keeps dying.
                if restarted_at.is_some_and(|t: Instant| t.elapsed() > Duration::from_secs(60)) {
                    backoff = RESTART_BACKOFF;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                restarted_at = Some(Instant::now());
            }
        }
    }
}

/// Decrements the queue depth for the jobs of one batch, even if running it panics.
struct Taken<'a>(&'a AtomicUsize, usize);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

fn worker(mut session: Box<dyn Backend>, ctx: &WorkerCtx, alive: &AtomicBool) {
    let WorkerCtx {
        rx,
        s,
        cfg,
        depth,
        arriving,
        observer,
        fault,
    } = ctx;
    let (s, cfg) = (*s, *cfg);
    // `recv` fails only when every sender is gone and the queue is empty: then the
    // queue is drained and the worker ends.
    while let Ok(first) = rx.recv() {
        let mut jobs = collect_batch(rx, first.taken(), cfg);
        await_arrivals(rx, &mut jobs, cfg, arriving);
        // Nobody waits for these any more: skip them.
        let taken = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        let gone = taken - jobs.len();
        if gone > 0 {
            observer.abandoned(gone);
        }
        let n = jobs.len();
        let guard = Taken(depth, taken);
        if n == 0 {
            drop(guard);
            observer.depth(depth.load(Ordering::SeqCst));
            continue;
        }
        let start = Instant::now();
        let queued: Vec<Duration> = jobs.iter().map(|j| start - j.enqueued).collect();
        let mut batch = Vec::with_capacity(n * 3 * s * s);
        let mut replies = Vec::with_capacity(n);
        for j in jobs {
            batch.extend_from_slice(&j.input);
            replies.push(j.reply);
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if fault.swap(false, Ordering::SeqCst) {
                panic!("injected inference worker fault");
            }
            session.run(batch, n, s)
        }));
        let result = match run {
            Ok(r) => r,
            Err(panic) => {
                // Not ready from now on; then answer this batch; then let the
                // supervisor restart the worker (this session is not used again).
                alive.store(false, Ordering::SeqCst);
                for reply in replies {
                    let _ = reply.send(Err(RunError::WorkerDied));
                }
                drop(guard);
                std::panic::resume_unwind(panic);
            }
        };
        let inference = start.elapsed();
        drop(guard);
        observer.depth(depth.load(Ordering::SeqCst));
        observer.batch(n, inference, &queued);
        answer(replies, result, &queued, inference);
    }
}

/// The first job and those that arrive within `batch_wait` of it, up to `max_batch`.
fn collect_batch(rx: &Receiver<Job>, first: Job, cfg: BatchConfig) -> Vec<Job> {
    let mut jobs = vec![first];
    let deadline = Instant::now() + cfg.batch_wait;
    while jobs.len() < cfg.max_batch {
        let now = Instant::now();
        if now >= deadline {
            // Take what is already there without waiting.
            match rx.try_recv() {
                Ok(j) => jobs.push(j.taken()),
                Err(_) => break,
            }
            continue;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(j) => jobs.push(j.taken()),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    jobs
}

/// How often a worker waiting for announced jobs looks whether they were withdrawn
/// (a request that failed to decode never arrives).
const ARRIVAL_POLL: Duration = Duration::from_micros(500);

/// Adds announced jobs to a batch that is not full, as they arrive, while some are
/// still announced, for at most `arrival_wait`.
fn await_arrivals(
    rx: &Receiver<Job>,
    jobs: &mut Vec<Job>,
    cfg: BatchConfig,
    arriving: &AtomicUsize,
) {
    let deadline = Instant::now() + cfg.arrival_wait;
    while jobs.len() < cfg.max_batch && arriving.load(Ordering::SeqCst) > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout((deadline - now).min(ARRIVAL_POLL)) {
            Ok(j) => jobs.push(j.taken()),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
}

/// Sends each job its output (with the batch's timings), or the batch's error.
fn answer(
    replies: Vec<Reply>,
    result: Result<Vec<ModelOutput>, RunError>,
    queued: &[Duration],
    inference: Duration,
) {
    let n = replies.len();
    match result {
        Ok(outs) => {
            for ((reply, p), q) in replies.into_iter().zip(outs).zip(queued) {
                // The caller may have gone (client disconnected): nothing to do then.
                let _ = reply.send(Ok(JobOutput {
                    probabilities: p.probabilities,
                    logits: p.logits,
                    cam: p.cam,
                    embedding: p.embedding,
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
