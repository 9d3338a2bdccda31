//! A request to the core: who asks ([`Asker`]), what they ask of the model
//! ([`Ask`]), validated into a [`Valid`] request (the variant and the threshold
//! chosen), then answered for the files or tensors a door received.

use std::sync::Arc;
use std::time::Instant;

use crate::imaging::Preprocessor;
use crate::imaging::dicom::DicomOptions;
use crate::imaging::sr::SrSource;
use crate::inference::ServedModel;
use crate::predict::Core;
use crate::predict::PredictError;
use crate::predict::answer::Facts;
use crate::predict::answer::classify;
use crate::predict::answer::complete_all;
use crate::predict::answer::refused;
use crate::predict::ask::Answers;
use crate::predict::ask::Ask;
use crate::predict::ask::Asker;
use crate::predict::ask::Valid;
use crate::predict::ask::decision;
use crate::predict::shadow;
use crate::predict::upload::Decoded;
use crate::predict::upload::SetOnDrop;
use crate::predict::upload::Upload;
use crate::predict::upload::decode_upload;
use crate::predict::upload::kilo;

impl Core {
    /// Chooses the variant (by name, or the one with the best measured
    /// sensitivity or specificity, or the default) and the threshold.
    pub fn validate(
        &self,
        asker: Asker,
        ask: &Ask,
        started: Instant,
    ) -> Result<Valid, PredictError> {
        if ask.model.is_some() && ask.prefer.is_some() {
            return Err(PredictError::InvalidAsk(
                "give `model` or `prefer`, not both".into(),
            ));
        }
        let models = self.models().ok_or(PredictError::NotReady)?;
        let model = models.select(ask.model.as_deref(), ask.prefer)?.clone();
        self.validate_for(asker, model, ask, started)
    }

    /// The variant `name` (its default version, or `version` when given), as the
    /// Open Inference Protocol names models.
    pub fn served(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ServedModel>, PredictError> {
        let models = self.models().ok_or(PredictError::NotReady)?;
        let m = models.get(name).ok_or_else(|| models.unknown(name))?;
        match version.filter(|v| !v.is_empty()) {
            None => Ok(m.clone()),
            Some(v) => models.get_version(name, v).cloned().ok_or_else(|| {
                PredictError::VersionNotLoaded(format!(
                    "model `{name}` version `{v}` (loaded: {})",
                    models.version_names(name).join(", ")
                ))
            }),
        }
    }

    /// As [`Core::validate`], for a variant the door has chosen itself (a V2 path).
    pub fn validate_for(
        &self,
        asker: Asker,
        model: Arc<ServedModel>,
        ask: &Ask,
        started: Instant,
    ) -> Result<Valid, PredictError> {
        let decision = decision(&model, ask)?;
        if ask.explain && !model.has_cam {
            // Refused before anything is classified or recorded: a door that answers
            // with the heatmap itself (Accept: image/png) has nothing to answer with.
            return Err(PredictError::ExplanationUnavailable(format!(
                "model `{}` {} has no `cam` output, so no heatmap can be drawn",
                model.card.name, model.card.version
            )));
        }
        Ok(Valid {
            asker,
            model,
            ask: ask.clone(),
            decision,
            explain: ask.explain,
            started,
        })
    }

    /// Answers encoded files (JPEG, PNG, DICOM): decoded through the gates, then
    /// [`Core::answer_decoded`]. A refusal of an image is recorded in the audit
    /// trail; the request is answered or refused whole.
    pub async fn answer_files(
        &self,
        valid: &Valid,
        uploads: Vec<Upload>,
    ) -> Result<Answers, PredictError> {
        if uploads.is_empty() {
            return Err(PredictError::InvalidRequest(
                "no image: send a JPEG/PNG body or multipart parts named `image`".into(),
            ));
        }
        let max = self.limits().max_images;
        if uploads.len() > max {
            return Err(PredictError::TooManyImages(uploads.len(), max));
        }
        // Kept (shared bytes) for the audit record of a refusal.
        let kept = uploads.clone();
        let decoded = match self
            .decode_all(
                &valid.model,
                uploads,
                valid.asker.trace.clone().filter(|t| t.recording()),
            )
            .await
        {
            Ok(d) => d,
            Err(e) => {
                let facts: Vec<Facts> = kept.iter().map(Facts::of_upload).collect();
                let (model, decision) = (&valid.model, &valid.decision);
                return Err(refused(self, model, decision, &facts, &valid.asker, e, None).await);
            }
        };
        drop(kept);
        self.answer_decoded(valid, decoded).await
    }

    /// Answers inputs already decoded (files, or the rows of a preprocessed
    /// tensor): classified together (so they batch), scored for distribution,
    /// labelled at the decision, recorded, then answered.
    pub async fn answer_decoded(
        &self,
        valid: &Valid,
        mut decoded: Vec<Decoded>,
    ) -> Result<Answers, PredictError> {
        let sources: Vec<SrSource> = decoded
            .iter_mut()
            .map(|d| d.sr.take().unwrap_or_default())
            .collect();
        let shadow = shadow::plan(self, &valid.model, &decoded);
        let audited = classify(self, valid, decoded).await?;
        if let Some(run) = shadow {
            // The candidate runs after the answer, on its own copy of the inputs.
            run.spawn(self, valid, shadow::answered(&audited));
        }
        let predictions = complete_all(self, valid, audited);
        Ok(Answers {
            predictions,
            sources,
        })
    }

    /// Decodes uploads on the blocking pool: a bounded number of requests decode at
    /// once, each reserving its images' declared pixels first.
    async fn decode_all(
        &self,
        model: &ServedModel,
        images: Vec<Upload>,
        recording: Option<Arc<crate::trace::RequestTrace>>,
    ) -> Result<Vec<Decoded>, PredictError> {
        let limits = self.limits();
        // Decode on the blocking pool, a bounded number at a time.
        let permit = self
            .inner
            .decode_permits
            .acquire()
            .await
            .map_err(|e| PredictError::Internal(e.to_string()))?;
        // Reserve the pixels to decode (from the headers), bounded like the bodies.
        let pixels: u64 = images
            .iter()
            .map(|u| {
                if u.is_dicom() {
                    limits.max_pixels
                } else {
                    crate::imaging::declared_pixels(u.bytes())
                        .unwrap_or(0)
                        .min(limits.max_pixels)
                }
            })
            .sum();
        // Decodes wait for their pixels (within the request's timeout): the body is
        // already in, and a burst of large images is slowed, not refused.
        let _pixels = self
            .inner
            .pixel_budget
            .acquire_many(kilo(pixels.min(limits.max_decode_pixels)))
            .await
            .map_err(|e| PredictError::Internal(e.to_string()))?;
        let pre: Preprocessor = model.preprocessor.clone();
        let max_pixels = limits.max_pixels;
        let dicom_opts = DicomOptions {
            geometry: limits.geometry,
            ..limits.dicom
        };
        // If this request goes (client gone, timed out), the images not yet decoded
        // are not decoded.
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _on_drop = SetOnDrop(gone.clone());
        // On their way to the model's queue: a batch that is not full waits for them.
        let arrivals: Vec<_> = images.iter().map(|_| model.announce()).collect();
        let mut decoded = tokio::task::spawn_blocking(move || {
            images
                .iter()
                .map(|u| {
                    if gone.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(PredictError::Timeout(0.0));
                    }
                    decode_upload(&pre, u, max_pixels, dicom_opts)
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        // A panic's message may quote the upload's content (a DICOM value): never
        // pass it on; the panic hook logged where it happened.
        .map_err(|_| PredictError::Internal("the image decoder failed".into()))??;
        drop(permit);
        for (d, a) in decoded.iter_mut().zip(arrivals) {
            d.arrival = Some(a);
        }
        let name = &model.card.name;
        let done = std::time::Instant::now();
        for (i, d) in decoded.iter().enumerate() {
            self.metrics()
                .decode_duration
                .with_label_values(&[name])
                .observe(d.took.as_secs_f64());
            if let Some(t) = &recording {
                // Images decode one after another on the blocking thread: each
                // ended where the next began (placed back from the last).
                let end = done
                    .checked_sub(decoded[i + 1..].iter().map(|d| d.took).sum())
                    .unwrap_or(done);
                let start = end.checked_sub(d.took).unwrap_or(end);
                let at = [("cxr.image_index", i.to_string())];
                let id = t.stage_under(None, "decode", start, end, &at);
                if let Some((g0, took)) = d.gates {
                    t.stage_under(Some(id), "gates", g0, g0 + took, &at);
                }
            }
        }
        Ok(decoded)
    }
}
