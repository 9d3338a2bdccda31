//! Results as DICOM objects to file in the source's study (IHE AI Results): the
//! TID 1500 SR of an answer and the Secondary Capture of its attention map, or, for
//! an image the core refused, an SR that says it was not analysed and why. The DICOM
//! node and the folder job file these; their UIDs are derived from what they are of
//! (the source image and the model file), so a resent image yields the same objects.

use crate::imaging::sr::ScImage;
use crate::imaging::sr::SrFinding;
use crate::imaging::sr::SrResult;
use crate::imaging::sr::SrSource;
use crate::imaging::sr::UidMaker;
use crate::imaging::sr::build_sc;
use crate::imaging::sr::build_sr;
use crate::inference::ServedModel;
use crate::predict::Core;
use crate::predict::PredictError;
use crate::predict::Prediction;
use crate::predict::Upload;
use crate::predict::Valid;

/// One result object, as a Part-10 file.
#[derive(Debug, Clone)]
pub struct ResultObject {
    /// `sr` or `sc`.
    pub kind: &'static str,
    /// Its SOP Instance UID.
    pub sop_instance_uid: String,
    /// The file.
    pub bytes: Vec<u8>,
}

/// What analysing one image for filing gave.
pub struct Filed {
    /// The answer, or the refusal of the image (a gate, the OOD score).
    pub outcome: Result<Prediction, PredictError>,
    /// The objects to file: SR and SC of an answer, the "not analysed" SR of a
    /// refusal (none when the image has no DICOM source to file them with).
    pub objects: Vec<ResultObject>,
}

/// The SR's model facts and finding for an answer.
fn classified<'a>(model: &'a ServedModel, p: &Prediction) -> SrResult<'a> {
    let card = &model.card;
    SrResult {
        variant: &card.name,
        version: &card.version,
        model_sha256: &card.onnx.sha256,
        signer: model
            .provenance
            .signed_by()
            .map(|s| (s.signer.as_str(), s.key_id.as_str())),
        finding: SrFinding::Classified {
            probability: f64::from(p.probabilities.PNEUMONIA),
            threshold: p.threshold,
            pneumonia: p.label.is_pneumonia(),
            caution: p.caution.clone(),
        },
    }
}

impl Core {
    /// What decides a result besides the image and the model file: the threshold
    /// and its source (a site card's provenance included), the OOD thresholds and
    /// action, and the gates (DICOM policy, geometry). Two results that differ in
    /// any of these are different results, with different UIDs; the same inputs
    /// give the same digest (an idempotent resend).
    pub fn decision_digest(&self, valid: &Valid) -> String {
        let model = &valid.model;
        let limits = self.limits();
        let g = &limits.geometry;
        let d = &limits.dicom;
        let facts = serde_json::json!({
            "threshold": valid.decision.threshold,
            "threshold_source": &valid.decision.source,
            "ood_action": format!("{:?}", limits.ood_action),
            "ood_threshold": model.ood_threshold(),
            "ood_refuse_threshold": model.ood_refuse_threshold(),
            "ood_sha256": model.card.ood.as_ref().map(|o| o.sha256.as_str()),
            "geometry": [f64::from(g.min_side), g.max_aspect],
            "dicom": {
                "allow_any_modality": d.allow_any_modality,
                "allow_lateral": d.allow_lateral,
                "geometry": [f64::from(d.geometry.min_side), d.geometry.max_aspect],
            },
        });
        crate::digest::sha256_hex(facts.to_string().as_bytes())
    }

    /// One answer as a DICOM Comprehensive 3D SR (TID 1500) in its source's study,
    /// with new UIDs.
    pub fn structured_report(
        &self,
        model: &ServedModel,
        source: &SrSource,
        p: &Prediction,
    ) -> Result<Vec<u8>, PredictError> {
        build_sr(
            source,
            &classified(model, p),
            &UidMaker::random(self.uid_root()),
        )
        .map_err(|e| PredictError::SrUnavailable(e.to_string()))
    }

    /// Analyses one image for filing: answered (with its attention map), then its
    /// SR and SC; or refused as an image, then the SR that says why. The objects
    /// are filed with the upload's DICOM source (read once, when it was
    /// identified; none: nothing to file them with); `key` is the result's
    /// [`Core::filing_key`] (the door made it to check its outbox first), from
    /// which the objects' UIDs are derived.
    ///
    /// Errors that are not about the image (not ready, overloaded, timeout, audit
    /// trail) are returned: nothing was decided, the sender should retry.
    pub async fn analyse_for_filing(
        &self,
        valid: &Valid,
        upload: Upload,
        key: &str,
    ) -> Result<Filed, PredictError> {
        let source = upload.source().cloned();
        let source = source.as_ref();
        let model = &valid.model;
        let card = &model.card;
        let study = |s: &SrSource| s.study_instance_uid.clone().unwrap_or_default();
        // The objects' UIDs come from everything that makes the result: the model
        // file, the image, the decision inputs, and what was decided (so that two
        // different results never share a UID, and a resend of the same gives the
        // same objects): the filing key says all of it but what was decided.
        let uids_for = |s: &SrSource, outcome: &str| {
            UidMaker::derived(
                self.uid_root(),
                format!("{key}/{outcome}"),
                format!("{}/{}", card.onnx.sha256, study(s)),
            )
        };
        let sr_error = |e: crate::imaging::sr::SrError| PredictError::SrUnavailable(e.0);
        match self.answer_files(valid, vec![upload]).await {
            Ok(mut answered) => {
                let p = answered.predictions.remove(0);
                let own = answered.sources.remove(0);
                let src = if own.study_instance_uid.is_some() {
                    Some(&own)
                } else {
                    source
                };
                let mut objects = Vec::new();
                if let Some(src) = src {
                    let outcome = format!(
                        "answered/{}/{}/{}",
                        p.label,
                        p.probabilities.PNEUMONIA.to_bits(),
                        p.in_distribution
                            .map_or("unscored", |d| if d { "in" } else { "shift" })
                    );
                    let uids = uids_for(src, &outcome);
                    objects.push(ResultObject {
                        kind: "sr",
                        sop_instance_uid: uids.instance("sr"),
                        bytes: build_sr(src, &classified(model, &p), &uids).map_err(sr_error)?,
                    });
                    if let Some(h) = &p.heatmap {
                        let overlay = &h.overlay;
                        let mut lines = vec![
                            format!(
                                "cxr {} {}: {} (P(pneumonia) {:.2}, threshold {:.2})",
                                card.name,
                                card.version,
                                p.label,
                                p.probabilities.PNEUMONIA,
                                p.threshold
                            ),
                            "Attention map of the model (CAM), not a localisation of disease"
                                .into(),
                        ];
                        if p.in_distribution == Some(false) {
                            lines.push("Out of distribution: do not rely on this label".into());
                        }
                        lines.push(
                            "Computer-generated AI result, not for standalone diagnosis".into(),
                        );
                        let sc = ScImage {
                            overlay,
                            lines,
                            algorithm: &format!("cxr {}", card.name),
                            versions: format!(
                                "{}\\{} {}",
                                env!("CARGO_PKG_VERSION"),
                                card.name,
                                card.version
                            ),
                        };
                        objects.push(ResultObject {
                            kind: "sc",
                            sop_instance_uid: uids.instance("sc"),
                            bytes: build_sc(src, &sc, &uids).map_err(sr_error)?,
                        });
                    }
                }
                Ok(Filed {
                    outcome: Ok(p),
                    objects,
                })
            }
            Err(e) if e.error_type().is_image_refusal() => {
                let mut objects = Vec::new();
                if let Some(src) = source {
                    let uids = uids_for(src, &format!("refused/{}", e.error_type().as_str()));
                    let result = SrResult {
                        variant: &card.name,
                        version: &card.version,
                        model_sha256: &card.onnx.sha256,
                        signer: model
                            .provenance
                            .signed_by()
                            .map(|s| (s.signer.as_str(), s.key_id.as_str())),
                        finding: SrFinding::NotAnalysed {
                            kind: e.error_type().as_str().into(),
                            reason: e.to_string(),
                        },
                    };
                    objects.push(ResultObject {
                        kind: "sr",
                        sop_instance_uid: uids.instance("sr"),
                        bytes: build_sr(src, &result, &uids).map_err(sr_error)?,
                    });
                }
                Ok(Filed {
                    outcome: Err(e),
                    objects,
                })
            }
            Err(e) => Err(e),
        }
    }
}
