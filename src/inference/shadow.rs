//! What a candidate version run in the shadow of a variant's default has shown: its
//! agreement with the answers given, by the class answered, and the runs shed.
//!
//! The core decides which requests a candidate runs on ([`ShadowTally::sample`]:
//! exactly `share` of them, spread evenly) and runs it after the answer is given
//! (`predict::shadow`); this is the tally `/models/{name}` reports.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use utoipa::ToSchema;

/// The agreement of a candidate with the answers of one class.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ClassAgreement {
    /// Images answered with this label that the candidate ran on.
    pub images: u64,
    /// Of them, those the candidate labelled the same.
    pub agreed: u64,
    /// `agreed / images` (none before the first).
    pub agreement: Option<f64>,
    /// Mean |P(PNEUMONIA) of the candidate − P(PNEUMONIA) answered|.
    pub mean_abs_delta_p: Option<f64>,
    /// Largest such difference.
    pub max_abs_delta_p: Option<f64>,
}

/// A candidate's tally (`/models/{name}`'s `shadow.agreement`).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ShadowReport {
    /// Every image the candidate ran on.
    pub overall: ClassAgreement,
    /// By the label answered: `NORMAL`, `PNEUMONIA`.
    pub by_answered_label: BTreeMap<String, ClassAgreement>,
    /// Requests sampled for the shadow but not run, by reason (`busy`: a shadow
    /// run was already waiting; `load`: the server did not fall idle in time;
    /// `queue_full`, `failed`, `preprocessing`: the candidate reads other inputs).
    pub shed: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    images: u64,
    agreed: u64,
    abs_dp: f64,
    max_abs_dp: f64,
}

impl Sums {
    fn add(&mut self, agreed: bool, abs_dp: f64) {
        self.images += 1;
        self.agreed += u64::from(agreed);
        self.abs_dp += abs_dp;
        self.max_abs_dp = self.max_abs_dp.max(abs_dp);
    }

    fn report(&self) -> ClassAgreement {
        let n = self.images as f64;
        ClassAgreement {
            images: self.images,
            agreed: self.agreed,
            agreement: (self.images > 0).then(|| self.agreed as f64 / n),
            mean_abs_delta_p: (self.images > 0).then(|| self.abs_dp / n),
            max_abs_delta_p: (self.images > 0).then_some(self.max_abs_dp),
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    by_label: BTreeMap<String, Sums>,
    shed: BTreeMap<String, u64>,
}

/// A candidate's running tally and its request counter.
#[derive(Debug, Default)]
pub struct ShadowTally {
    seen: AtomicU64,
    tally: Mutex<Tally>,
}

impl ShadowTally {
    /// Whether the next request runs the candidate: of every run of requests,
    /// exactly `share` of them (the k-th request is chosen when ⌊(k+1)·share⌋
    /// passes ⌊k·share⌋), so a share of 0.25 runs one request in four.
    pub fn sample(&self, share: f64) -> bool {
        let k = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        let share = share.clamp(0.0, 1.0);
        ((k + 1.0) * share).floor() > (k * share).floor()
    }

    /// One image: the label answered, whether the candidate agreed, and
    /// |Δ P(PNEUMONIA)|.
    pub fn add(&self, answered_label: &str, agreed: bool, abs_dp: f64) {
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        t.by_label
            .entry(answered_label.to_string())
            .or_default()
            .add(agreed, abs_dp);
    }

    /// A sampled request not run, and why.
    pub fn shed(&self, reason: &str) {
        let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        *t.shed.entry(reason.to_string()).or_default() += 1;
    }

    /// The tally so far.
    pub fn report(&self) -> ShadowReport {
        let t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        let mut overall = Sums::default();
        for s in t.by_label.values() {
            overall.images += s.images;
            overall.agreed += s.agreed;
            overall.abs_dp += s.abs_dp;
            overall.max_abs_dp = overall.max_abs_dp.max(s.max_abs_dp);
        }
        ShadowReport {
            overall: overall.report(),
            by_answered_label: t
                .by_label
                .iter()
                .map(|(k, s)| (k.clone(), s.report()))
                .collect(),
            shed: t.shed.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_runs_exactly_the_share_spread_evenly() {
        let t = ShadowTally::default();
        let picks: Vec<bool> = (0..8).map(|_| t.sample(0.25)).collect();
        assert_eq!(
            picks,
            [false, false, false, true, false, false, false, true]
        );
        let t = ShadowTally::default();
        assert!((0..10).all(|_| t.sample(1.0)));
        let t = ShadowTally::default();
        assert_eq!((0..1000).filter(|_| t.sample(0.1)).count(), 100);
    }

    #[test]
    fn report_sums_by_label_and_overall() {
        let t = ShadowTally::default();
        t.add("NORMAL", true, 0.1);
        t.add("NORMAL", false, 0.5);
        t.add("PNEUMONIA", true, 0.2);
        t.shed("load");
        let r = t.report();
        assert_eq!(r.overall.images, 3);
        assert_eq!(r.overall.agreed, 2);
        assert!((r.overall.mean_abs_delta_p.unwrap() - 0.8 / 3.0).abs() < 1e-12);
        assert_eq!(r.overall.max_abs_delta_p, Some(0.5));
        let n = &r.by_answered_label["NORMAL"];
        assert_eq!((n.images, n.agreed, n.agreement), (2, 1, Some(0.5)));
        assert_eq!(r.shed["load"], 1);
    }
}
