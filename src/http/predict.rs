//! `POST /predict`: read the uploads (raw or multipart, within the body budget),
//! decode them (bounded blocking decodes), classify them through the model's
//! [`ServedModel::classify`], score their distance from the training images, write
//! the audit records, and answer in JSON, a heatmap PNG or DICOM Structured Reports.

use super::*;

/// Multipart upload of one or more images.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct PredictUpload {
    /// One or more X-ray images (JPEG, PNG or DICOM), each in a part named `image`.
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<Vec<u8>>,
}

/// Classify one or more chest X-rays.
///
/// Send a raw body (`Content-Type: image/jpeg`, `image/png` or `application/dicom`) or
/// `multipart/form-data` with one or more parts named `image` (parts typed
/// `application/octet-stream` are sniffed: DICOM by its `DICM` magic). One image
/// answers one object; several multipart images answer an array in the same order.
/// A DICOM answer echoes the study, series and instance UIDs (never a patient
/// attribute) and may carry `warnings` (lateral view, multi-frame).
#[utoipa::path(
    post,
    path = "/predict",
    tag = "inference",
    params(PredictQuery),
    security((), ("bearer" = []), ("api_key" = [])),
    request_body(
        description = "The X-ray(s)",
        content(
            ("image/jpeg"),
            ("image/png"),
            ("application/dicom"),
            (PredictUpload = "multipart/form-data")
        )
    ),
    responses(
        (status = 200, description = "The prediction (an array for several multipart images); with `Accept: application/dicom` and DICOM uploads, a DICOM Comprehensive 3D SR (TID 1500) per image: one application/dicom body, or multipart/related; type=\"application/dicom\" for several",
            content((Prediction = "application/json"), ("application/dicom"), ("multipart/related"))),
        (status = 406, description = "Accept: application/dicom (a Structured Report) for an upload that is not DICOM", body = ErrorBody,
            example = json!({"error": "a DICOM Structured Report (Accept: application/dicom) answers DICOM uploads only; send application/dicom or accept application/json", "error_type": "not_acceptable"})),
        (status = 400, description = "Empty, undecodable, cut short or malformed upload (JPEG, PNG or DICOM)", body = ErrorBody,
            example = json!({"error": "could not decode the image: unexpected end of file", "error_type": "invalid_image"})),
        (status = 401, description = "API keys are required (--api-keys-file) and none or an unknown one was sent (with WWW-Authenticate)", body = ErrorBody,
            example = json!({"error": "the API key is not valid", "error_type": "unauthorized"})),
        (status = 403, description = "The key's caller lacks the `predict` scope", body = ErrorBody,
            example = json!({"error": "caller `dashboard` may not use this route: its key lacks the `predict` scope", "error_type": "forbidden"})),
        (status = 408, description = "The body did not arrive within --body-timeout-s", body = ErrorBody,
            example = json!({"error": "the request body did not arrive within 30 s", "error_type": "body_timeout"})),
        (status = 404, description = "Unknown model", body = ErrorBody,
            example = json!({"error": "unknown model `x`; GET /models lists the variants", "error_type": "model_not_found"})),
        (status = 413, description = "Body, pixel count or image count over the limit", body = ErrorBody,
            example = json!({"error": "image of 60000x60000 pixels exceeds the limit of 40000000 pixels", "error_type": "too_many_pixels"})),
        (status = 415, description = "Unsupported content type, image format or DICOM transfer syntax", body = ErrorBody,
            example = json!({"error": "Content-Type text/plain is not supported; send image/jpeg, image/png or multipart/form-data", "error_type": "unsupported_media_type"})),
        (status = 422, description = "Invalid query; an operating point no threshold reached on validation (operating_point_unreachable); an input that is not a chest radiograph: a geometry no radiograph has (implausible_geometry), blank or saturated (blank_image), a colour photo (colour_image), a DICOM of another body part (wrong_body_part) or a lateral view (lateral_view), or an image whose out-of-distribution score is above the model's threshold (out_of_distribution, with details); a DICOM object that is not a classifiable radiograph (modality, samples per pixel, missing pixel data); a heatmap asked of a model without cam (explanation_unavailable)", body = ErrorBody,
            example = json!({"error": "invalid query: unknown variant `speed`, expected `sensitivity` or `specificity`", "error_type": "invalid_query"})),
        (status = 503, description = "Not ready, overloaded, timed out, or the audit record could not be written (audit_unavailable); with Retry-After", body = ErrorBody,
            example = json!({"error": "model `weighted` is at capacity; retry shortly", "error_type": "overloaded"}))
    )
)]
pub(super) async fn predict(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let limits = &state.inner.limits;
    let _reserved = reserve_body(&state, &req)?;
    let started = Instant::now();
    let rid = request_id(req.headers());
    let caller = caller_of(&req);
    let accept = accept_header(req.headers());
    let q: PredictQuery = match req.uri().query() {
        None => PredictQuery::default(),
        Some(_) => {
            Query::<PredictQuery>::try_from_uri(req.uri())
                .map_err(|e| ApiError::InvalidQuery(e.body_text()))?
                .0
        }
    };
    // The body first, under its own deadline: a slow client holds only its bytes'
    // reservation, not a processing slot.
    let (images, multipart) = tokio::time::timeout(limits.body_timeout, read_images(&state, req))
        .await
        .map_err(|_| ApiError::BodyTimeout(limits.body_timeout.as_secs()))??;
    let _permit = inflight_slot(&state)?;
    let input = Input {
        started,
        rid,
        caller,
        accept,
        q,
        images,
        multipart,
    };
    within_request_timeout(&state, predict_inner(&state, input)).await
}

/// The caller the auth middleware let in (`anonymous` when the API is open).
pub(super) fn caller_of(req: &Request) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}

/// One of the `--max-inflight` processing slots, or 503 at once.
pub(super) fn inflight_slot(
    state: &AppState,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    state.inner.inflight.try_acquire().map_err(|_| {
        state.metrics().overloaded.with_label_values(&["all"]).inc();
        ApiError::Overloaded("any".into())
    })
}

/// `job` under `--request-timeout-s` (503 `timeout` past it).
pub(super) async fn within_request_timeout(
    state: &AppState,
    job: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let timeout = state.inner.limits.request_timeout;
    tokio::time::timeout(timeout, job)
        .await
        .unwrap_or(Err(ApiError::Timeout(timeout.as_secs_f64())))
}

/// Reserves a request body's bytes in the buffered-body budget before it is read (its
/// declared length, or the most a body may be): what is buffered stays bounded.
pub(super) fn reserve_body<'a>(
    state: &'a AppState,
    req: &Request,
) -> Result<BodyReservation<'a>, ApiError> {
    let limits = &state.inner.limits;
    // Reserve the body's bytes before reading it: what is buffered stays bounded. A
    // body of unknown length (chunked) reserves the most a body may be.
    let declared = axum::body::HttpBody::size_hint(req.body()).exact();
    let reserve = declared
        .unwrap_or(limits.max_body_bytes as u64)
        .min(limits.max_body_bytes as u64);
    // Large bodies may fill all but 1/SMALL_BODY_SHARE of the budget, so that a flood
    // of them never refuses an ordinary X-ray.
    let large = if reserve > SMALL_BODY_BYTES {
        match state
            .inner
            .large_body_budget
            .try_acquire_many(kilo(reserve))
        {
            Ok(p) => Some(p),
            Err(_) => {
                state.metrics().overloaded.with_label_values(&["all"]).inc();
                return Err(ApiError::BufferFull(limits.max_buffered_bytes));
            }
        }
    } else {
        None
    };
    let Ok(bytes) = state.inner.body_budget.try_acquire_many(kilo(reserve)) else {
        state.metrics().overloaded.with_label_values(&["all"]).inc();
        return Err(ApiError::BufferFull(limits.max_buffered_bytes));
    };
    Ok((bytes, large))
}

/// A body's bytes in the buffered-body budget (and in the large-body share).
pub(super) type BodyReservation<'a> = (
    tokio::sync::SemaphorePermit<'a>,
    Option<tokio::sync::SemaphorePermit<'a>>,
);

/// A `/predict` request whose body has been read.
pub(super) struct Input {
    pub(super) started: Instant,
    pub(super) rid: String,
    pub(super) caller: Caller,
    /// The Accept header (`application/dicom`: answer Structured Reports;
    /// `image/png`: answer the heatmap overlay).
    pub(super) accept: Option<String>,
    pub(super) q: PredictQuery,
    pub(super) images: Vec<Upload>,
    pub(super) multipart: bool,
}

pub(super) async fn predict_inner(state: &AppState, input: Input) -> Result<Response, ApiError> {
    let limits = &state.inner.limits;
    let Input {
        started,
        rid,
        caller,
        accept,
        q,
        images,
        multipart,
    } = input;
    let wants_sr = accepts(accept.as_deref(), "application/dicom");
    let wants_png = accepts(accept.as_deref(), "image/png");
    if q.model.is_some() && q.prefer.is_some() {
        return Err(ApiError::InvalidQuery(
            "give `model` or `prefer`, not both".into(),
        ));
    }
    let models = state.models().ok_or(ApiError::NotReady)?;
    let model = models.select(q.model.as_deref(), q.prefer)?.clone();
    let decision = decision(&model, &q)?;
    if images.is_empty() {
        return Err(ApiError::BadRequest(
            "no image: send a JPEG/PNG body or multipart parts named `image`".into(),
        ));
    }
    if images.len() > limits.max_images {
        return Err(ApiError::TooManyImages(images.len(), limits.max_images));
    }

    if wants_sr && images.iter().any(|u| !matches!(u, Upload::Dicom(_))) {
        return Err(ApiError::NotAcceptable(
            "a DICOM Structured Report (Accept: application/dicom) answers DICOM uploads only; send application/dicom or accept application/json".into(),
        ));
    }
    let mut decoded = decode_all(state, &model, images).await?;
    let sources: Vec<_> = decoded
        .iter_mut()
        .map(|d| d.sr.take().unwrap_or_default())
        .collect();
    let explain = q.explain.is_some() || wants_png;
    if wants_png && (multipart && decoded.len() > 1) {
        return Err(ApiError::NotAcceptable(
            "Accept: image/png answers one image with its heatmap overlay; send one image or accept application/json".into(),
        ));
    }
    let predictions = classify(
        state, &model, &decision, decoded, &caller, &rid, started, explain,
    )
    .await?;
    if wants_png {
        let Some(h) = predictions.first().and_then(|p| p.heatmap.as_ref()) else {
            return Err(ApiError::ExplanationUnavailable(format!(
                "model `{}` {} has no `cam` output, so no heatmap can be drawn",
                model.card.name, model.card.version
            )));
        };
        let png =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &h.overlay_png)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
        return Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response());
    }
    if wants_sr {
        return structured_reports(state, &model, &sources, &predictions, multipart);
    }
    Ok(if multipart && predictions.len() > 1 {
        Json(predictions).into_response()
    } else {
        Json(predictions.into_iter().next().expect("at least one image")).into_response()
    })
}

/// Decodes uploads on the blocking pool: a bounded number of requests decode at once,
/// each reserving its images' declared pixels first.
pub(super) async fn decode_all(
    state: &AppState,
    model: &ServedModel,
    images: Vec<Upload>,
) -> Result<Vec<Decoded>, ApiError> {
    let limits = &state.inner.limits;
    // Decode on the blocking pool, a bounded number at a time.
    let permit = state
        .inner
        .decode_permits
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    // Reserve the pixels to decode (from the headers), bounded like the bodies.
    let pixels: u64 = images
        .iter()
        .map(|u| match u {
            Upload::Encoded(b) => crate::imaging::declared_pixels(b)
                .unwrap_or(0)
                .min(limits.max_pixels),
            Upload::Dicom(_) => limits.max_pixels,
        })
        .sum();
    // Decodes wait for their pixels (within the request's timeout): the body is
    // already in, and a burst of large images is slowed, not refused.
    let _pixels = state
        .inner
        .pixel_budget
        .acquire_many(kilo(pixels.min(limits.max_decode_pixels)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let pre: Preprocessor = model.preprocessor.clone();
    let max_pixels = limits.max_pixels;
    let dicom_opts = DicomOptions {
        geometry: limits.geometry,
        ..limits.dicom
    };
    // If this request goes (client gone, timed out), the images not yet decoded are
    // not decoded.
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _on_drop = SetOnDrop(gone.clone());
    let decoded = tokio::task::spawn_blocking(move || {
        images
            .iter()
            .map(|u| {
                if gone.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(ApiError::Timeout(0.0));
                }
                decode_upload(&pre, u, max_pixels, dicom_opts)
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("decode task failed: {e}")))??;
    drop(permit);
    let name = &model.card.name;
    for d in &decoded {
        state
            .metrics()
            .decode_duration
            .with_label_values(&[name])
            .observe(d.took.as_secs_f64());
    }
    Ok(decoded)
}

/// Runs decoded inputs through `model` (queued together, so they batch), writes their
/// audit records (a record that cannot be written fails the whole request), and
/// returns the answers in order.
#[allow(clippy::too_many_arguments)]
pub(super) async fn classify(
    state: &AppState,
    model: &ServedModel,
    decision: &Decision,
    decoded: Vec<Decoded>,
    caller: &Caller,
    rid: &str,
    started: Instant,
    explain: bool,
) -> Result<Vec<Prediction>, ApiError> {
    let name = model.card.name.clone();
    // An explanation draws on the input, so it keeps a copy.
    let mut decoded = decoded;
    let inputs = decoded
        .iter_mut()
        .map(|d| {
            if explain {
                d.input.clone()
            } else {
                std::mem::take(&mut d.input)
            }
        })
        .collect();
    let outputs = model.classify(inputs).await.map_err(|e| {
        if let InferError::Overloaded(_) = e {
            state.metrics().overloaded.with_label_values(&[&name]).inc();
        }
        ApiError::from(e)
    })?;
    let out: Vec<(JobOutput, Decoded)> = outputs.into_iter().zip(decoded).collect();
    let ood = ood_scores(state, model, &out)?;
    // Every answer's audit record is written before any is given: an answer without
    // its record is a 503, never a success.
    let time = crate::audit::now_rfc3339();
    let answers: Vec<(Prediction, JobOutput, Decoded)> = out
        .into_iter()
        .zip(ood)
        .map(|((r, d), (score, inside))| {
            let p = Prediction {
                ood_score: score,
                in_distribution: inside,
                ..prediction(model, &r, decision, rid)
            };
            (p, r, d)
        })
        .collect();
    for (i, (p, _, d)) in answers.iter().enumerate() {
        let record = AuditRecord {
            time: time.clone(),
            request_id: rid.to_string(),
            image_index: i,
            caller: caller.0.clone(),
            model: p.model.name.clone(),
            model_version: p.model.version.clone(),
            model_sha256: p.model.sha256.clone(),
            threshold: p.threshold,
            threshold_source: p.threshold_source.kind.clone(),
            p_normal: p.probabilities.NORMAL,
            p_pneumonia: p.probabilities.PNEUMONIA,
            label: p.label.clone(),
            input_sha256: d.upload.sha256.clone(),
            input_kind: d.upload.kind.into(),
            input_bytes: d.upload.bytes,
            sop_instance_uid: d.dicom.as_ref().and_then(|i| i.sop_instance_uid.clone()),
        };
        if state.inner.audit.record(&record).is_err() {
            state
                .metrics()
                .audit_failures
                .with_label_values(&[] as &[&str])
                .inc();
            return Err(ApiError::AuditUnavailable);
        }
    }
    let total = started.elapsed();
    Ok(answers
        .into_iter()
        .map(|(p, r, d)| {
            state
                .metrics()
                .predictions
                .with_label_values(&[&name, &p.label])
                .inc();
            model.record(total.as_secs_f64() * 1e3);
            let mut warnings = d.warnings;
            if let (Some(false), Some(o)) = (p.in_distribution, &model.ood) {
                warnings.push(format!(
                    "out of distribution: score {:.3} above the model's threshold {:.3}; this image does not resemble the pediatric frontal chest radiographs the model was trained on, so its label should not be relied on",
                    p.ood_score.unwrap_or(f64::NAN),
                    o.threshold
                ));
            }
            let heatmap = match (explain, &r.cam) {
                (false, _) => None,
                (true, None) => {
                    warnings.push(format!(
                        "explanation unavailable: model `{}` {} has no `cam` output",
                        model.card.name, model.card.version
                    ));
                    None
                }
                (true, Some(cam)) => Some(explain::heatmap(
                    cam,
                    usize::from(p.label == "PNEUMONIA"),
                    &p.label,
                    &d.input,
                    model.card.input_size,
                    &model.card.preprocessing,
                )),
            };
            Prediction {
                timings_ms: Timings {
                    decode: ms(d.took),
                    queue: ms(r.queued),
                    inference: ms(r.inference),
                    total: ms(total),
                },
                dicom: d.dicom,
                warnings,
                heatmap,
                ..p
            }
        })
        .collect())
}

/// An image's out-of-distribution score and whether it is within the threshold.
pub(super) type OodVerdict = (Option<f64>, Option<bool>);

/// Each reply's out-of-distribution score and verdict (none without an OOD model or
/// with `--ood-action off`); with `refuse`, the first image out of distribution
/// refuses the request.
pub(super) fn ood_scores(
    state: &AppState,
    model: &ServedModel,
    out: &[(JobOutput, Decoded)],
) -> Result<Vec<OodVerdict>, ApiError> {
    let action = state.inner.limits.ood_action;
    let (Some(ood), false) = (&model.ood, action == OodAction::Off) else {
        return Ok(vec![(None, None); out.len()]);
    };
    let mut v = Vec::with_capacity(out.len());
    for (i, (r, _)) in out.iter().enumerate() {
        let e = r.embedding.as_deref().ok_or_else(|| {
            ApiError::Internal("the model has an OOD model but returned no embedding".into())
        })?;
        let score = ood.score(e);
        let inside = score <= ood.threshold;
        if !inside {
            state
                .metrics()
                .out_of_distribution
                .with_label_values(&[&model.card.name, action.as_str()])
                .inc();
            if action == OodAction::Refuse {
                return Err(ApiError::OutOfDistribution {
                    model: model.card.name.clone(),
                    image: i,
                    score,
                    threshold: ood.threshold,
                });
            }
        }
        v.push((Some(score), Some(inside)));
    }
    Ok(v)
}

/// The Accept header's values, joined.
pub(super) fn accept_header(headers: &HeaderMap) -> Option<String> {
    let v: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!v.is_empty()).then(|| v.join(","))
}

/// Whether an Accept value names `media` exactly (not by a wildcard) with a non-zero q.
pub(super) fn accepts(accept: Option<&str>, media: &str) -> bool {
    accept.into_iter().flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';');
        let m = parts.next().unwrap_or("").trim();
        let q_zero = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        m.eq_ignore_ascii_case(media) && !q_zero
    })
}

/// The answers as DICOM Structured Reports: one `application/dicom` body, or a
/// `multipart/related; type="application/dicom"` body of one SR per image.
pub(super) fn structured_reports(
    state: &AppState,
    model: &ServedModel,
    sources: &[crate::imaging::sr::SrSource],
    predictions: &[Prediction],
    multipart: bool,
) -> Result<Response, ApiError> {
    use crate::imaging::sr::{SrResult, build_sr};
    let card = &model.card;
    let mut files = Vec::with_capacity(predictions.len());
    for (src, p) in sources.iter().zip(predictions) {
        let result = SrResult {
            variant: &card.name,
            version: &card.version,
            model_sha256: &card.onnx.sha256,
            probability: f64::from(p.probabilities.PNEUMONIA),
            threshold: p.threshold,
            pneumonia: p.label == "PNEUMONIA",
        };
        files.push(
            build_sr(src, &result, state.inner.uid_root.as_deref())
                .map_err(ApiError::SrUnavailable)?,
        );
    }
    if !(multipart && files.len() > 1) {
        let body = files.pop().expect("at least one image");
        return Ok(([(header::CONTENT_TYPE, "application/dicom")], body).into_response());
    }
    let boundary = format!("cxr-sr-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for f in &files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let ct = format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    Ok(([(header::CONTENT_TYPE, ct)], body).into_response())
}

/// The threshold a request is answered at, and where it came from.
pub(super) struct Decision {
    pub(super) threshold: f64,
    pub(super) source: ThresholdSource,
}

/// The card's threshold, or the caller's `threshold=`, or the one that reached the
/// caller's `operating_point=` on the card's validation ROC.
pub(super) fn decision(model: &ServedModel, q: &PredictQuery) -> Result<Decision, ApiError> {
    let card = &model.card;
    match (q.threshold, q.operating_point.as_deref()) {
        (Some(_), Some(_)) => Err(ApiError::InvalidQuery(
            "give `threshold` or `operating_point`, not both".into(),
        )),
        (Some(t), None) => {
            if !(t > 0.0 && t < 1.0) {
                return Err(ApiError::InvalidQuery(format!(
                    "threshold {t} must lie in (0, 1)"
                )));
            }
            Ok(Decision {
                threshold: t,
                source: ThresholdSource {
                    kind: "query".into(),
                    rule: None,
                    target: None,
                    validation_sensitivity: None,
                    validation_specificity: None,
                },
            })
        }
        (None, Some(op)) => {
            let target: Target = op.parse().map_err(ApiError::InvalidQuery)?;
            let curve = card.operating_curve.as_ref().ok_or_else(|| {
                ApiError::OperatingPoint(format!(
                    "model `{}` {} has no validation ROC in its card, so no operating point can be chosen; use `threshold`",
                    card.name, card.version
                ))
            })?;
            let p = curve.threshold_for(target).ok_or_else(|| {
                ApiError::OperatingPoint(format!(
                    "no threshold of model `{}` reached {target} on its validation ROC ({})",
                    card.name, curve.source
                ))
            })?;
            Ok(Decision {
                threshold: p.threshold,
                source: ThresholdSource {
                    kind: "operating_point".into(),
                    rule: None,
                    target: Some(target.to_string()),
                    validation_sensitivity: Some(p.tpr),
                    validation_specificity: Some(1.0 - p.fpr),
                },
            })
        }
        (None, None) => Ok(Decision {
            threshold: card.threshold,
            source: ThresholdSource {
                kind: "card".into(),
                rule: card.threshold_rule.clone(),
                target: None,
                validation_sensitivity: None,
                validation_specificity: None,
            },
        }),
    }
}

pub(super) fn prediction(
    model: &ServedModel,
    r: &JobOutput,
    d: &Decision,
    rid: &str,
) -> Prediction {
    let p = served_probabilities(r.logits, r.probabilities, model.card.temperature());
    let pneumonia = f64::from(p[1]) >= d.threshold;
    let (label, confidence) = if pneumonia {
        ("PNEUMONIA", p[1])
    } else {
        ("NORMAL", p[0])
    };
    Prediction {
        label: label.into(),
        confidence,
        probabilities: Probabilities {
            NORMAL: p[0],
            PNEUMONIA: p[1],
        },
        threshold: d.threshold,
        threshold_source: d.source.clone(),
        model: ModelRef {
            name: model.card.name.clone(),
            version: model.card.version.clone(),
            strategy: model.card.training.strategy,
            sha256: model.card.onnx.sha256.clone(),
            precision: model.card.precision,
        },
        execution_provider: model.provider.as_str().into(),
        timings_ms: Timings {
            decode: 0.0,
            queue: 0.0,
            inference: 0.0,
            total: 0.0,
        },
        request_id: rid.to_string(),
        dicom: None,
        warnings: Vec::new(),
        ood_score: None,
        in_distribution: None,
        heatmap: None,
    }
}
