//! The outbox's sending loop, one for every kind of destination: due items are
//! claimed, grouped by destination and handed to that destination's [`Channel`](crate::delivery::Channel)
//! (C-STORE and STOW-RS in `dicom_node`, HL7 v2 over MLLP in `hl7`), which settles
//! each: sent; refused by the destination (a C-STORE failure status, a 4xx, an HL7
//! AE/AR), tried again after a backoff up to the policy's attempts, then a dead
//! letter; or failed without an answer (unreachable, timed out), tried again until
//! the policy gives up. Items not tried because their connection broke before them
//! are given back without counting an attempt. The claim on a round's items is
//! renewed before each send, so a slow destination never lets another replica take
//! (and send again) items this one still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use crate::delivery::Delivery;
use crate::delivery::outbox::Failure;
use crate::delivery::outbox::Item;
use crate::delivery::outbox::Settled;

/// How often sent records and dead letters past the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long items for a destination this replica does not have wait before another
/// look (another replica's sender may have it).
const NOT_HERE_WAIT: Duration = Duration::from_secs(30);

/// Why one item was not delivered, and whether the destination refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    /// Refused (counted against the policy's attempts) or failed (retried until
    /// the policy gives up).
    pub how: Failure,
    /// Why (kept with a dead letter: no patient data in it).
    pub reason: String,
}

impl SendError {
    /// The destination answered and refused the item.
    pub fn refused(reason: String) -> Self {
        Self {
            how: Failure::Refused,
            reason,
        }
    }

    /// No answer.
    pub fn failed(reason: String) -> Self {
        Self {
            how: Failure::Failed,
            reason,
        }
    }
}

/// One round: the items claimed, and which of them are not settled yet (their
/// claim is renewed before each send). Its calls block (the outbox's): make them
/// from blocking threads ([`blocking`]).
pub struct Round {
    delivery: Arc<Delivery>,
    unsettled: Mutex<Vec<i64>>,
    sent: AtomicBool,
}

impl Round {
    /// Renews the claim on every item of the round not settled yet.
    pub fn renew(&self) {
        let ids = lock(&self.unsettled).clone();
        if let Err(e) = self.delivery.outbox.renew(&ids) {
            tracing::error!(error = %e, "outbox not writable (claim renewal)");
        }
    }

    /// Marks `item` sent, due again or dead, and counts it.
    pub fn settle(&self, name: &str, item: &Item, result: Result<(), SendError>) {
        lock(&self.unsettled).retain(|id| *id != item.id);
        let metrics = &self.delivery.metrics;
        let count = |outcome: &str| {
            metrics
                .dicom_results
                .with_label_values(&[name, outcome])
                .inc();
        };
        let outbox = &self.delivery.outbox;
        let marked = match result {
            Ok(()) => {
                count("sent");
                self.sent.store(true, Ordering::Relaxed);
                tracing::info!(destination = %name, uid = %item.sop_instance_uid, kind = %item.kind, "result sent");
                outbox.sent(item.id)
            }
            Err(e) => match outbox.fail(item, e.how, &e.reason) {
                Ok(Settled::Retry(after)) => {
                    count("retried");
                    tracing::warn!(destination = %name, uid = %item.sop_instance_uid, kind = %item.kind, attempt = item.attempts + 1, refused = (e.how == Failure::Refused), retry_in_s = after.as_secs(), error = %e.reason, "result not sent; will retry");
                    Ok(())
                }
                Ok(Settled::Dead) => {
                    count("dead_letter");
                    tracing::error!(destination = %name, uid = %item.sop_instance_uid, kind = %item.kind, attempts = item.attempts + 1, error = %e.reason, "result not sent; set aside as a dead letter (GET /dicom/outbox/dead-letters)");
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = marked {
            tracing::error!(error = %e, "outbox not writable");
        }
    }

    /// Gives `items` back untried: no attempt counted.
    pub fn release(&self, items: &[Item], after: Duration) {
        let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
        lock(&self.unsettled).retain(|id| !ids.contains(id));
        if let Err(e) = self.delivery.outbox.release(&ids, after) {
            tracing::error!(error = %e, "outbox not writable");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` on a blocking thread (the outbox's calls block).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// The sending loop: due items, sent by destination; then a wait until the next is
/// due, or until new results are queued. Hourly, records past the retention go.
pub(super) async fn run(delivery: Arc<Delivery>) {
    let mut pruned = Instant::now();
    loop {
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = Instant::now();
            let o = delivery.outbox.clone();
            if let Some(Err(e)) = blocking(move || o.prune()).await {
                tracing::error!(error = %e, "outbox not prunable");
            }
        }
        let outbox = delivery.outbox.clone();
        let items = match blocking(move || outbox.due(32)).await {
            Some(Ok(items)) => items,
            Some(Err(e)) => {
                tracing::error!(error = %e, "outbox not readable");
                Vec::new()
            }
            None => Vec::new(),
        };
        if items.is_empty() {
            let d = delivery.clone();
            let _ = blocking(move || d.update_gauges()).await;
            let outbox = delivery.outbox.clone();
            let next = blocking(move || outbox.next_due_in())
                .await
                .and_then(Result::ok)
                .flatten()
                .unwrap_or(Duration::from_secs(5))
                .clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::select! {
                () = delivery.wake.notified() => {}
                () = tokio::time::sleep(next) => {}
            }
            continue;
        }
        let round = Arc::new(Round {
            delivery: delivery.clone(),
            unsettled: Mutex::new(items.iter().map(|i| i.id).collect()),
            sent: AtomicBool::new(false),
        });
        let mut by_destination: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for i in items {
            by_destination
                .entry(i.destination.clone())
                .or_default()
                .push(i);
        }
        for (name, items) in by_destination {
            match delivery.channels.iter().find(|c| c.name() == name) {
                Some(channel) => channel.clone().send(round.clone(), items).await,
                None => {
                    // A destination no longer configured here (another replica's):
                    // its items wait for a sender that has it, no attempt counted.
                    let r = round.clone();
                    let _ = blocking(move || r.release(&items, NOT_HERE_WAIT)).await;
                }
            }
        }
        // Anything the round left unsettled (a sender that panicked) is given back.
        let r = round.clone();
        let _ = blocking(move || {
            let ids = lock(&r.unsettled).clone();
            if !ids.is_empty() {
                let _ = r.delivery.outbox.release(&ids, Duration::from_secs(1));
            }
            if r.sent.load(Ordering::Relaxed) {
                // Sent payloads were overwritten in the file; their old frames
                // leave the write-ahead log now.
                if let Err(e) = r.delivery.outbox.compact() {
                    tracing::warn!(error = %e, "outbox log not emptied");
                }
            }
            r.delivery.update_gauges();
        })
        .await;
    }
}
