//! The filing identity of an image: what its results are of, made here for every
//! door (the DICOM node, the folder job, `/predict` with an order), so that the same
//! image is filed under the same key whichever door it came through, and a door
//! only translates. [`Core::filing_key`] adds the model file and the decision
//! inputs to it.

use crate::imaging::dicom::SrSource;
use crate::predict::Core;
use crate::predict::PredictError;
use crate::predict::Valid;
use crate::predict::upload::Upload;

/// Bytes up to which an upload is identified on the calling thread; a larger one
/// is hashed (and parsed) on a blocking thread.
const IDENTIFY_INLINE: usize = 64 * 1024;

/// The order a caller named for an image's result (`/predict`'s
/// `accession_number`, `patient_id`, `study_instance_uid`).
#[derive(Debug, Clone, Copy)]
pub struct FilingOrder<'a> {
    /// AccessionNumber.
    pub accession_number: &'a str,
    /// PatientID.
    pub patient_id: &'a str,
    /// StudyInstanceUID, when given.
    pub study_instance_uid: Option<&'a str>,
}

impl FilingOrder<'_> {
    /// The SHA-256 of the order's identifiers, one per line (hex).
    fn digest(&self) -> String {
        crate::digest::sha256_hex(
            format!(
                "{}\n{}\n{}",
                self.accession_number,
                self.patient_id,
                self.study_instance_uid.unwrap_or_default()
            )
            .as_bytes(),
        )
    }
}

/// What an image's results are of: a readable DICOM instance by its SOP Instance
/// UID and the hash of its pixel data (the same instance sent again is the same,
/// whatever else of the file changed); any other upload by the hash of its bytes;
/// an image for an order by the hash of its bytes and of the order. With the
/// upload's DICOM source, when it has one.
#[derive(Debug, Clone)]
pub struct Identity {
    seed: String,
    source: Option<SrSource>,
}

impl Identity {
    /// An image's own identity (the DICOM node, the folder job). CPU work the first
    /// time an upload is asked (a DICOM parse, hashes): see [`Core::identify`].
    pub fn of(upload: &Upload) -> Self {
        let source = upload.source().cloned();
        let seed = match upload.instance() {
            Some(Ok(i)) => format!(
                "{}/{}",
                i.source().sop_instance_uid.as_deref().unwrap_or_default(),
                i.pixels_sha256()
            ),
            Some(Err(_)) | None => upload.sha256().to_string(),
        };
        Self { seed, source }
    }

    /// An image's identity for `order`: the same image for the same order is one
    /// result (delivered once).
    pub fn of_ordered(upload: &Upload, order: &FilingOrder<'_>) -> Self {
        Self::ordered(upload, &order.digest())
    }

    fn ordered(upload: &Upload, order_digest: &str) -> Self {
        Self {
            seed: format!("predict/{}/{order_digest}", upload.sha256()),
            source: upload.source().cloned(),
        }
    }

    /// What the key is made from (the image, and the order when there is one).
    pub fn seed(&self) -> &str {
        &self.seed
    }

    /// The upload's DICOM source (what result objects and reports are filed with);
    /// `None` when it is not DICOM or could not be read.
    pub fn source(&self) -> Option<&SrSource> {
        self.source.as_ref()
    }
}

impl Core {
    /// The filing identity of `upload` (for `order`, when a caller named one): the
    /// upload hashed and, when DICOM, parsed once, on a blocking thread when it is
    /// large; the decoder then renders that parse.
    pub async fn identify(
        &self,
        upload: &Upload,
        order: Option<&FilingOrder<'_>>,
    ) -> Result<Identity, PredictError> {
        let order = order.map(FilingOrder::digest);
        let make = move |u: &Upload| match &order {
            Some(o) => Identity::ordered(u, o),
            None => Identity::of(u),
        };
        if upload.bytes().len() <= IDENTIFY_INLINE {
            return Ok(make(upload));
        }
        let u = upload.clone();
        tokio::task::spawn_blocking(move || make(&u))
            .await
            .map_err(|_| PredictError::Internal("identifying the upload failed".into()))
    }

    /// The key under which the results of one image ([`Identity`]) analysed by
    /// `valid`'s model file with `valid`'s decision inputs are filed: the same key
    /// is never analysed twice, and a change of any input
    /// ([`Core::decision_digest`]) makes a new result.
    pub fn filing_key(&self, valid: &Valid, identity: &Identity) -> String {
        format!(
            "{}/{}/{}",
            valid.model.card.onnx.sha256,
            self.decision_digest(valid),
            identity.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::Preprocessing;
    use crate::imaging::Preprocessor;
    use crate::imaging::dicom::DicomError;
    use crate::imaging::dicom::DicomOptions;
    use crate::predict::UploadFacts;
    use crate::predict::UploadKind;
    use crate::predict::upload::decode_upload;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    use sha2::Digest;

    const SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.1";
    const SOP: &str = "1.2.826.0.1.3680043.10.99.3";

    /// SHA-256 hex, computed here (not by the crate's `digest`).
    fn sha(b: &[u8]) -> String {
        format!("{:x}", sha2::Sha256::digest(b))
    }

    /// A 96 x 96 MONOCHROME2 CR (a gradient, explicit VR little endian) and its
    /// pixel data.
    fn dicom_file() -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> = (0..96u32 * 96)
            .map(|i| ((i % 96) * 2 + i / 96) as u8)
            .collect();
        let mut o = InMemDicomObject::new_empty();
        let mut put = |tag, vr, v: PrimitiveValue| o.put(DataElement::new(tag, vr, v));
        put(tags::SOP_CLASS_UID, VR::UI, SOP_CLASS.into());
        put(tags::SOP_INSTANCE_UID, VR::UI, SOP.into());
        put(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.99.1".into(),
        );
        put(tags::MODALITY, VR::CS, "CR".into());
        put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
        put(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2".into(),
        );
        put(tags::ROWS, VR::US, PrimitiveValue::from(96u16));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(96u16));
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16));
        put(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        );
        put(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(pixels.clone()),
        );
        let file = o
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                    .media_storage_sop_class_uid(SOP_CLASS)
                    .media_storage_sop_instance_uid(SOP),
            )
            .expect("a complete meta group");
        let mut out = Vec::new();
        file.write_all(&mut out).expect("written to memory");
        (out, pixels)
    }

    fn jpeg() -> Vec<u8> {
        let img = image::GrayImage::from_fn(96, 96, |x, y| image::Luma([(x * 2 + y) as u8]));
        let mut out = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageFormat::Jpeg,
        )
        .expect("encoded to memory");
        out
    }

    fn decode(upload: &Upload) -> Result<crate::predict::Decoded, PredictError> {
        let pre = Preprocessor::new(32, &Preprocessing::default()).expect("a preprocessor");
        decode_upload(&pre, upload, 1 << 24, DicomOptions::default())
    }

    /// One parse per DICOM instance: its identity and its decode share it (a decoder
    /// that parsed the bytes again would count two).
    #[test]
    fn a_dicom_upload_is_parsed_once_for_its_identity_and_its_decode() {
        let (bytes, _) = dicom_file();
        let before = crate::imaging::dicom::parses();
        let upload = Upload::sniff(bytes.into());
        assert_eq!(upload.kind(), UploadKind::Dicom);
        let identity = Identity::of(&upload);
        let decoded = decode(&upload.clone()).expect("a decodable radiograph");
        assert_eq!(crate::imaging::dicom::parses() - before, 1);
        assert_eq!(
            decoded.sr.and_then(|s| s.sop_instance_uid).as_deref(),
            Some(SOP)
        );
        assert_eq!(
            identity
                .source()
                .and_then(|s| s.sop_instance_uid.as_deref()),
            Some(SOP)
        );
        assert_eq!(decoded.upload.kind, "dicom");
    }

    /// A DICOM instance is filed by its SOP Instance UID and its pixel data's hash;
    /// the audit's hash is still that of the whole file.
    #[test]
    fn a_dicom_identity_is_its_sop_instance_and_pixels() {
        let (bytes, pixels) = dicom_file();
        let upload = Upload::dicom(bytes.clone().into());
        let identity = Identity::of(&upload);
        assert_eq!(identity.seed(), format!("{SOP}/{}", sha(&pixels)));
        assert_eq!(UploadFacts::of(&upload).sha256, sha(&bytes));
    }

    /// A JPEG is filed by the hash of its bytes, the audit's hash the same.
    #[test]
    fn a_jpeg_identity_is_its_bytes_hash() {
        let bytes = jpeg();
        let upload = Upload::sniff(bytes.clone().into());
        assert_eq!(upload.kind(), UploadKind::Jpeg);
        assert_eq!(Identity::of(&upload).seed(), sha(&bytes));
        assert!(Identity::of(&upload).source().is_none());
        let facts = UploadFacts::of(&upload);
        assert_eq!(
            (facts.sha256.as_str(), facts.kind),
            (sha(&bytes).as_str(), "jpeg")
        );
    }

    /// `/predict` with an order: the bytes' hash and the order's, as before the
    /// core made it (existing outboxes dedupe the same way).
    #[test]
    fn an_ordered_identity_is_unchanged() {
        let (dicom, _) = dicom_file();
        for bytes in [jpeg(), dicom] {
            let upload = Upload::sniff(bytes.clone().into());
            let with_study = FilingOrder {
                accession_number: "ACC-1",
                patient_id: "PID-1",
                study_instance_uid: Some("1.2.3"),
            };
            assert_eq!(
                Identity::of_ordered(&upload, &with_study).seed(),
                format!("predict/{}/{}", sha(&bytes), sha(b"ACC-1\nPID-1\n1.2.3"))
            );
            let without = FilingOrder {
                study_instance_uid: None,
                ..with_study
            };
            assert_eq!(
                Identity::of_ordered(&upload, &without).seed(),
                format!("predict/{}/{}", sha(&bytes), sha(b"ACC-1\nPID-1\n"))
            );
        }
    }

    /// A file with the DICOM magic that cannot be read: filed by its bytes' hash,
    /// and its decode refuses it with the parse's own error (not parsed again).
    #[test]
    fn an_unreadable_dicom_is_filed_by_its_bytes_and_refused_once() {
        let mut bytes = vec![0u8; 128];
        bytes.extend_from_slice(b"DICMnot a meta group");
        let before = crate::imaging::dicom::parses();
        let upload = Upload::sniff(bytes.clone().into());
        assert_eq!(Identity::of(&upload).seed(), sha(&bytes));
        assert!(Identity::of(&upload).source().is_none());
        assert!(matches!(
            decode(&upload),
            Err(PredictError::Dicom(DicomError::Malformed(_)))
        ));
        assert_eq!(crate::imaging::dicom::parses() - before, 1);
    }
}
