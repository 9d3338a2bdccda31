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
    /// The patient and order identifiers a report to the RIS or EHR names, decoded
    /// (Unicode, by the source's Specific Character Set).
    pub ids: SourceIds,
}

/// The patient and order attributes of a source image, decoded to Unicode (for the
/// HL7 and FHIR reports; the SR copies the encoded elements instead).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SourceIds {
    /// PatientID (0010,0020).
    pub patient_id: Option<String>,
    /// IssuerOfPatientID (0010,0021).
    pub issuer_of_patient_id: Option<String>,
    /// PatientName (0010,0010), its alphabetic group.
    pub patient_name: Option<String>,
    /// PatientBirthDate (0010,0030).
    pub patient_birth_date: Option<String>,
    /// PatientSex (0010,0040).
    pub patient_sex: Option<String>,
    /// AccessionNumber (0008,0050).
    pub accession_number: Option<String>,
    /// PlacerOrderNumberImagingServiceRequest (0040,2016).
    pub placer_order_number: Option<String>,
    /// FillerOrderNumberImagingServiceRequest (0040,2017).
    pub filler_order_number: Option<String>,
    /// Modality (0008,0060).
    pub modality: Option<String>,
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
            ids: SourceIds {
                patient_id: text(tags::PATIENT_ID),
                issuer_of_patient_id: text(tags::ISSUER_OF_PATIENT_ID),
                // The alphabetic group of a PN (ideographic and phonetic follow `=`).
                patient_name: text(tags::PATIENT_NAME)
                    .and_then(|n| n.split('=').next().map(str::to_string))
                    .filter(|n| !n.is_empty()),
                patient_birth_date: text(tags::PATIENT_BIRTH_DATE),
                patient_sex: text(tags::PATIENT_SEX),
                accession_number: text(tags::ACCESSION_NUMBER),
                placer_order_number: text(tags::PLACER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST),
                filler_order_number: text(tags::FILLER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST),
                modality: text(tags::MODALITY),
            },
        }
    }
}
