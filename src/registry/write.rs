//! Writing models and editing cards: a new variant's ONNX file and card, the OOD
//! entry of a card, and an older file rewritten by the current writer.

use std::path::Path;

use super::*;

/// Names `ood` (a fitted out-of-distribution model beside the card) in the card at
/// `card_path`, replacing any earlier entry; nothing else in the card changes.
pub fn set_card_ood(card_path: &Path, ood: &crate::ood::OodCard) -> Result<(), String> {
    // The card's text is edited, not re-serialised: serde_json's float parsing is not
    // exact to the last bit, so a parse-print round trip would move its numbers. The
    // writer puts `ood` last; an earlier entry is cut from there.
    let text = std::fs::read_to_string(card_path).map_err(|e| e.to_string())?;
    let card: ModelCard = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let body = match (&card.ood, text.rfind(",\n  \"ood\": ")) {
        (Some(_), Some(at)) => &text[..at],
        (Some(_), None) => {
            return Err("the card's ood entry is not where its writer puts it".into());
        }
        (None, _) => text
            .trim_end()
            .strip_suffix('}')
            .ok_or("the card does not end with `}`")?
            .trim_end(),
    };
    let entry = serde_json::to_string_pretty(ood).map_err(|e| e.to_string())?;
    let json = format!("{body},\n  \"ood\": {}\n}}\n", entry.replace('\n', "\n  "));
    let tmp = card_path.with_extension("json.tmp");
    std::fs::write(&tmp, json).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, card_path).map_err(|e| e.to_string())?;
    load_card(card_path).map(|_| ()).map_err(|e| e.to_string())
}

/// What [`write_model`] needs to write a variant.
#[derive(Debug, Clone)]
pub struct NewModel<'a> {
    /// Variant name (file stem).
    pub name: &'a str,
    /// Version string.
    pub version: &'a str,
    /// Card description.
    pub description: &'a str,
    /// Architecture name for humans (`densenet161`, `densenet-tiny`).
    pub architecture_name: &'a str,
    /// Network configuration.
    pub config: &'a crate::arch::DenseNetConfig,
    /// Weights with torchvision names.
    pub weights: &'a crate::arch::Weights,
    /// Square input size.
    pub input_size: u32,
    /// Weight storage in the file.
    pub storage: crate::onnx::WeightStorage,
    /// Decision threshold on P(PNEUMONIA).
    pub threshold: f64,
    /// Training recipe.
    pub training: Recipe,
    /// Measured metrics.
    pub metrics: CardMetrics,
}

/// Writes `<dir>/<name>.onnx` and its card `<dir>/<name>.json`; returns the card.
pub fn write_model(dir: &Path, m: &NewModel<'_>) -> Result<ModelCard, String> {
    use prost::Message;
    let opts = crate::onnx::WriteOptions {
        input_size: m.input_size,
        storage: m.storage,
        metadata: vec![
            ("cxr.name".into(), m.name.into()),
            ("cxr.version".into(), m.version.into()),
        ],
    };
    let bytes = crate::onnx::write_densenet(m.config, m.weights, &opts)?.encode_to_vec();
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let file = format!("{}.onnx", m.name);
    let card = ModelCard {
        name: m.name.into(),
        version: m.version.into(),
        description: m.description.into(),
        architecture: Architecture {
            name: m.architecture_name.into(),
            config: m.config.clone(),
            parameters: m.config.trainable_parameter_count() as u64,
        },
        input_size: m.input_size,
        preprocessing: crate::imaging::Preprocessing::default(),
        class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        threshold: m.threshold,
        threshold_rule: None,
        calibration: None,
        operating_curve: None,
        onnx: OnnxFile {
            file: file.clone(),
            sha256: sha256_hex(&bytes),
            weight_storage: m.storage,
            bytes: bytes.len() as u64,
        },
        training: m.training.clone(),
        metrics: m.metrics.clone(),
        ood: None,
        precision: crate::quantize::Precision::Fp32,
        quantization: None,
    };
    std::fs::write(dir.join(&file), &bytes).map_err(|e| format!("cannot write {file}: {e}"))?;
    let json = serde_json::to_string_pretty(&card).expect("a model card always serialises") + "\n";
    std::fs::write(dir.join(format!("{}.json", m.name)), json)
        .map_err(|e| format!("cannot write the card: {e}"))?;
    Ok(card)
}

/// Rewrites a model's ONNX file with the current writer, from the file's own weights
/// (same storage, input size and metadata), so that older files gain the outputs the
/// writer has added since (`cam`, `embedding`); checks on random inputs that the new
/// file's `logits` and `probabilities` equal the old file's, then updates the card's
/// hash and size. Returns the old and new SHA-256.
pub fn rewrite_onnx(card_path: &Path, ort_lib: &Path) -> Result<(String, String), String> {
    use prost::Message;
    let loaded = load_card(card_path).map_err(|e| e.to_string())?;
    let mut card = loaded.card;
    let old = loaded.onnx_bytes;
    let weights = crate::onnx::read_weights(&old).map_err(|e| e.to_string())?;
    let model = crate::onnx::proto::ModelProto::decode(&old[..]).map_err(|e| e.to_string())?;
    let opts = crate::onnx::WriteOptions {
        input_size: card.input_size,
        storage: card.onnx.weight_storage,
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    };
    let new =
        crate::onnx::write_densenet(&card.architecture.config, &weights, &opts)?.encode_to_vec();

    let load =
        |bytes: &[u8]| crate::inference::CpuModel::load(ort_lib, bytes).map_err(|e| e.to_string());
    let (mut a, mut b) = (load(&old)?, load(&new)?);
    let s = card.input_size as usize;
    let mut r = crate::arch::SplitMix64(20261126);
    let x: Vec<f32> = (0..2 * 3 * s * s)
        .map(|_| (r.uniform() * 4.0 - 2.0) as f32)
        .collect();
    let oa = a.run(x.clone(), 2, s).map_err(|e| e.to_string())?;
    let ob = b.run(x, 2, s).map_err(|e| e.to_string())?;
    for (p, q) in oa.iter().zip(&ob) {
        if p.logits != q.logits || p.probabilities != q.probabilities {
            return Err(format!(
                "the rewritten file answers differently: {:?} vs {:?}",
                (p.logits, p.probabilities),
                (q.logits, q.probabilities)
            ));
        }
    }
    if ob.iter().any(|o| o.cam.is_none()) {
        return Err("the rewritten file has no cam output".into());
    }
    let dir = card_path.parent().unwrap_or(Path::new("."));
    let old_sha = card.onnx.sha256.clone();
    let new_sha = sha256_hex(&new);
    // Only the hash and the size change: the card's text is edited in place, so that
    // no other value (floats included) is re-serialised.
    let text = std::fs::read_to_string(card_path).map_err(|e| e.to_string())?;
    let (from_sha, from_bytes) = (
        format!("\"sha256\": \"{old_sha}\""),
        format!("\"bytes\": {}", card.onnx.bytes),
    );
    if text.matches(&from_sha).count() != 1 || text.matches(&from_bytes).count() != 1 {
        return Err("the card's onnx sha256 and bytes are not where its writer puts them".into());
    }
    let text = text
        .replace(&from_sha, &format!("\"sha256\": \"{new_sha}\""))
        .replace(&from_bytes, &format!("\"bytes\": {}", new.len()));
    std::fs::write(dir.join(&card.onnx.file), &new)
        .map_err(|e| format!("cannot write {}: {e}", card.onnx.file))?;
    std::fs::write(card_path, text).map_err(|e| format!("cannot write the card: {e}"))?;
    card.onnx.sha256 = new_sha;
    Ok((old_sha, card.onnx.sha256))
}
