"""Radiographs for the HL7 tests, made by pydicom (by tests/dicom_node's maker),
with a patient and order whose values need HL7 escaping and a UTF-8 character set:
film.dcm (a CR), lateral.dcm (a lateral view: refused, so its ORU says why),
film2.dcm (another CR of the same patient).

    python make_films.py OUTDIR
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "dicom_node"))
from make_instances import make  # noqa: E402

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for seed, (name, kind) in enumerate([("film", "cr"), ("lateral", "lateral"), ("film2", "cr2")]):
    ds = make(kind, 100 + seed)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller&Co^Zoë^Q^Dr^Jr"
    ds.PatientID = "PAT|7"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientSex = "F"
    ds.PatientBirthDate = "20200102"
    ds.AccessionNumber = "ACC^1"
    ds.PlacerOrderNumberImagingServiceRequest = "PL~7"
    ds.FillerOrderNumberImagingServiceRequest = "FL-9"
    ds.save_as(os.path.join(out, f"{name}.dcm"), enforce_file_format=True)
