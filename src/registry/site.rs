//! The site card: what a site chose for each model after validating it on its own
//! films (`cxr-train validate … --choose …`): the decision threshold and, optionally,
//! the out-of-distribution acceptance, with where they came from (the site, the date,
//! how many films, the report's SHA-256). The server applies it with `--site-card`
//! (answers then carry `threshold_source.kind: site`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::eval::site::Interval;

/// A site card (`site-card.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteCard {
    /// The site (hospital, department), as the validation named it.
    pub site: String,
    /// The day the validation ran (YYYY-MM-DD).
    pub date: String,
    /// SHA-256 of the site report (`site-report.json`) the choices come from.
    pub report_sha256: String,
    /// What wrote it (`cxr-train validate` and its version).
    pub generated_by: String,
    /// One entry per validated model.
    pub models: Vec<SiteModel>,
}

/// What a site chose for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteModel {
    /// The model's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the ONNX file that was validated: the card applies to that file only.
    pub onnx_sha256: String,
    /// Labelled films the threshold was chosen on.
    pub n: u64,
    /// The decision threshold on P(PNEUMONIA) (calibrated, as served).
    pub threshold: f64,
    /// How it was chosen (e.g. `sensitivity:0.95 on 624 site films`).
    pub rule: String,
    /// Sensitivity at it on the site's films, with its 95 % interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Interval>,
    /// Specificity at it, with its 95 % interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specificity: Option<Interval>,
    /// The out-of-distribution threshold fitted on the site's films (none: the
    /// model card's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_threshold: Option<f64>,
    /// The share of the site's films `ood_threshold` accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_acceptance: Option<f64>,
}

/// Where a site-chosen threshold came from (in answers' `threshold_source`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SiteProvenance {
    /// The site.
    pub site: String,
    /// The day of its validation.
    pub date: String,
    /// Labelled films the threshold was chosen on.
    pub n: u64,
    /// SHA-256 of the site report.
    pub report_sha256: String,
}

/// A model's site entry as the server applies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppliedSite {
    /// Where it came from.
    pub provenance: SiteProvenance,
    /// What the site chose.
    pub model: SiteModel,
}

impl AppliedSite {
    /// One line for the audit trail: site, date and report hash.
    pub fn audit_name(&self) -> String {
        format!(
            "{} {} report sha256:{}",
            self.provenance.site, self.provenance.date, self.provenance.report_sha256
        )
    }
}

crate::message_error!(
    /// A site card that cannot be applied.
    SiteCardError
);

impl SiteCard {
    /// Reads and checks a site card.
    pub fn load(path: &Path) -> Result<Self, SiteCardError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SiteCardError(format!("site card {}: {e}", path.display())))?;
        let card: Self = serde_json::from_str(&text)
            .map_err(|e| SiteCardError(format!("site card {}: {e}", path.display())))?;
        for m in &card.models {
            if !(m.threshold > 0.0 && m.threshold < 1.0) {
                return Err(SiteCardError(format!(
                    "site card {}: model `{}`: threshold {} is not in (0, 1)",
                    path.display(),
                    m.name,
                    m.threshold
                )));
            }
            if m.ood_threshold.is_some_and(|t| !t.is_finite() || t <= 0.0) {
                return Err(SiteCardError(format!(
                    "site card {}: model `{}`: ood_threshold must be a positive number",
                    path.display(),
                    m.name
                )));
            }
        }
        Ok(card)
    }

    /// The entry for the model `name` whose ONNX file has `sha256`: none when the card
    /// has no entry for it; an error when its entry is for another file (the site's
    /// measurements do not apply to it).
    pub fn entry_for(
        &self,
        name: &str,
        sha256: &str,
    ) -> Result<Option<AppliedSite>, SiteCardError> {
        let Some(m) = self.models.iter().find(|m| m.name == name) else {
            return Ok(None);
        };
        if !m.onnx_sha256.eq_ignore_ascii_case(sha256) {
            return Err(SiteCardError(format!(
                "the site card of {} ({}) was measured on another file of model `{name}` (sha256 {}, served {sha256}): validate this file on the site's films again",
                self.site, self.date, m.onnx_sha256
            )));
        }
        Ok(Some(AppliedSite {
            provenance: SiteProvenance {
                site: self.site.clone(),
                date: self.date.clone(),
                n: m.n,
                report_sha256: self.report_sha256.clone(),
            },
            model: m.clone(),
        }))
    }
}
