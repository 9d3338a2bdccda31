//! What a result object (an SR, a Secondary Capture) needs of its source image: the
//! study, series and instance UIDs and the patient and study attributes it is filed
//! with, copied as they were encoded. Read here, where the object is decoded; the
//! result writers (`imaging::sr`) use it.

use dicom_core::{DataElement, Tag};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// The source attributes an SR carries for filing, copied as they were encoded.
pub const COPIED_TAGS: [Tag; 9] = [
    tags::SPECIFIC_CHARACTER_SET,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::REFERRING_PHYSICIAN_NAME,
];

/// What an SR needs of its source image. Its `Debug` shows no patient attribute.
#[derive(Clone, Default)]
pub struct SrSource {
    copied: Vec<DataElement<InMemDicomObject>>,
    /// StudyInstanceUID.
    pub study_instance_uid: Option<String>,
    /// SeriesInstanceUID.
    pub series_instance_uid: Option<String>,
    /// SOPClassUID (or the meta's MediaStorageSOPClassUID).
    pub sop_class_uid: Option<String>,
    /// SOPInstanceUID.
    pub sop_instance_uid: Option<String>,
}

impl std::fmt::Debug for SrSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrSource")
            .field("copied_attributes", &self.copied.len())
            .field("sop_instance_uid", &self.sop_instance_uid)
            .finish()
    }
}

impl SrSource {
    /// The source attributes copied into results, as they were encoded.
    pub fn copied(&self) -> &[DataElement<InMemDicomObject>] {
        &self.copied
    }

    /// Takes the attributes an SR needs from a decoded source object.
    pub fn from_object(obj: &InMemDicomObject, meta_sop_class: Option<&str>) -> Self {
        let text = |tag| super::text(obj, tag);
        Self {
            copied: COPIED_TAGS
                .iter()
                .filter_map(|t| obj.element_opt(*t).ok().flatten().cloned())
                .collect(),
            study_instance_uid: text(tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(tags::SERIES_INSTANCE_UID),
            sop_class_uid: text(tags::SOP_CLASS_UID)
                .or_else(|| meta_sop_class.map(|s| s.trim_end_matches('\0').to_string())),
            sop_instance_uid: text(tags::SOP_INSTANCE_UID),
        }
    }
}
