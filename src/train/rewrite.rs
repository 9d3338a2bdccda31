//! `cxr-train rewrite-onnx`: a shipped model's file rewritten by the current writer,
//! checked against the old one through the runtime. Here, above the registry and the
//! runtime, because it uses both.

use std::path::Path;

use crate::train::error::TrainError;

/// Rewrites a model's ONNX file with the current writer, from the file's own weights
/// (same storage, input size and metadata), so that older files gain the outputs the
/// writer has added since (`cam`, `embedding`); checks on random inputs that the new
/// file's `logits` and `probabilities` equal the old file's, then updates the card's
/// hash and size. Returns the old and new SHA-256.
pub fn rewrite_onnx(card_path: &Path, ort_lib: &Path) -> Result<(String, String), TrainError> {
    let graph = |e: String| TrainError::Graph(e);
    use prost::Message;
    let loaded = crate::registry::load_card(card_path).map_err(|e| graph(e.to_string()))?;
    let mut card = loaded.card;
    let old = loaded.onnx_bytes;
    let weights = crate::model::onnx::read_weights(&old).map_err(|e| graph(e.to_string()))?;
    let model = crate::model::onnx::proto::ModelProto::decode(&old[..])
        .map_err(|e| graph(e.to_string()))?;
    let opts = crate::model::onnx::WriteOptions {
        input_size: card.input_size,
        storage: card.onnx.weight_storage,
        metadata: model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect(),
    };
    let new = crate::model::onnx::write_densenet(&card.architecture.config, &weights, &opts)
        .map_err(|e| graph(e.to_string()))?
        .encode_to_vec();

    let load = |bytes: &[u8]| {
        crate::inference::CpuModel::load(ort_lib, bytes).map_err(|e| graph(e.to_string()))
    };
    let (mut a, mut b) = (load(&old)?, load(&new)?);
    let s = card.input_size as usize;
    let mut r = crate::model::arch::SplitMix64(20261126);
    let x: Vec<f32> = (0..2 * 3 * s * s)
        .map(|_| (r.uniform() * 4.0 - 2.0) as f32)
        .collect();
    let oa = a.run(x.clone(), 2, s).map_err(|e| graph(e.to_string()))?;
    let ob = b.run(x, 2, s).map_err(|e| graph(e.to_string()))?;
    for (p, q) in oa.iter().zip(&ob) {
        if p.logits != q.logits || p.probabilities != q.probabilities {
            return Err(graph(format!(
                "the rewritten file answers differently: {:?} vs {:?}",
                (p.logits, p.probabilities),
                (q.logits, q.probabilities)
            )));
        }
    }
    if ob.iter().any(|o| o.cam.is_none()) {
        return Err(graph("the rewritten file has no cam output".into()));
    }
    let dir = card_path.parent().unwrap_or(Path::new("."));
    let old_sha = card.onnx.sha256.clone();
    let new_sha = crate::digest::sha256_hex(&new);
    // Only the hash and the size change: the card's text is edited in place, so that
    // no other value (floats included) is re-serialised.
    let text = std::fs::read_to_string(card_path).map_err(|e| graph(e.to_string()))?;
    let (from_sha, from_bytes) = (
        format!("\"sha256\": \"{old_sha}\""),
        format!("\"bytes\": {}", card.onnx.bytes),
    );
    if text.matches(&from_sha).count() != 1 || text.matches(&from_bytes).count() != 1 {
        return Err(graph(
            "the card's onnx sha256 and bytes are not where its writer puts them".into(),
        ));
    }
    let text = text
        .replace(&from_sha, &format!("\"sha256\": \"{new_sha}\""))
        .replace(&from_bytes, &format!("\"bytes\": {}", new.len()));
    std::fs::write(dir.join(&card.onnx.file), &new)
        .map_err(|e| TrainError::Write(format!("cannot write {}: {e}", card.onnx.file)))?;
    std::fs::write(card_path, text)
        .map_err(|e| TrainError::Write(format!("cannot write the card: {e}")))?;
    card.onnx.sha256 = new_sha;
    Ok((old_sha, card.onnx.sha256))
}
