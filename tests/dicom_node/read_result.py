"""Reads a result object with pydicom (not with cxr's code) and prints what the
DICOM node's test checks, as JSON: its class, study, the source it references, and
for an SR its finding, probability and reason.

    python read_result.py FILE
"""
import json, sys
import pydicom

ds = pydicom.dcmread(sys.argv[1])
out = {
    "sop_class": str(ds.SOPClassUID),
    "sop_instance": str(ds.SOPInstanceUID),
    "modality": ds.Modality,
    "study": str(ds.StudyInstanceUID),
    "patient_id": str(ds.get("PatientID", "")),
    "references": [],
}
for ev in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
    for se in ev.ReferencedSeriesSequence:
        for r in se.ReferencedSOPSequence:
            out["references"].append(str(r.ReferencedSOPInstanceUID))
for r in ds.get("SourceImageSequence", []):
    out["references"].append(str(r.ReferencedSOPInstanceUID))


def walk(items):
    for it in items:
        yield it
        yield from walk(it.get("ContentSequence", []))


if "ContentSequence" in ds:
    for it in walk(ds.ContentSequence):
        name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
        if it.ValueType == "CODE" and name == "Pneumonia":
            out["finding"] = it.ConceptCodeSequence[0].CodeMeaning
        elif it.ValueType == "NUM" and name == "Probability":
            out["probability"] = float(it.MeasuredValueSequence[0].NumericValue)
        elif it.ValueType == "TEXT" and name == "Reason not analysed":
            out["reason"] = str(it.TextValue)
if "PixelData" in ds:
    out["rows"], out["columns"] = int(ds.Rows), int(ds.Columns)
    out["photometric"] = ds.PhotometricInterpretation
    out["burned_in"] = ds.get("BurnedInAnnotation", "")
print(json.dumps(out))
