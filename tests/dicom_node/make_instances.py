"""Radiographs for the DICOM node's tests, made by pydicom (not by cxr):
cr.dcm (Computed Radiography), dx.dcm (Digital X-Ray for presentation),
lateral.dcm (a CR lateral view: refused by the gates, so its SR says why),
ct.dcm (a CT slice: a SOP class the node does not take) and cr2.dcm (another CR).
All in one study.

    python make_instances.py OUTDIR
"""
import sys, os
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STUDY = "1.2.826.0.1.3680043.8.498.11111111111111111111"
CLASSES = {
    "cr": "1.2.840.10008.5.1.4.1.1.1",
    "dx": "1.2.840.10008.5.1.4.1.1.1.1",
    "lateral": "1.2.840.10008.5.1.4.1.1.1",
    "ct": "1.2.840.10008.5.1.4.1.1.2",
    "cr2": "1.2.840.10008.5.1.4.1.1.1",
}
MODALITY = {"cr": "CR", "dx": "DX", "lateral": "CR", "ct": "CT", "cr2": "CR"}


def film(seed, size=256):
    """A chest-like film: a lighter body with two darker lung fields, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 2200 + 600 * np.exp(-((x - 0.5) ** 2) / 0.08)
    for cx in (0.32, 0.68):
        img -= 1100 * np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.5) / 0.25) ** 2))
    img += rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 4095).astype(np.uint16)


def make(kind, seed):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CLASSES[kind]
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[kind, str(seed)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CLASSES[kind]
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "TEST^CXR"
    ds.PatientID = "CXR-0001"
    ds.PatientBirthDate = "20200101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", kind])
    ds.StudyDate = "20261206"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = MODALITY[kind]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "LL" if kind == "lateral" else "PA"
    ds.PatientOrientation = ["L", "F"] if kind == "lateral" else ["R", "F"]
    px = film(seed)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if kind == "dx":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.DetectorType = "SCINTILLATOR"
    if kind == "ct":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelData = px.tobytes()
    return ds


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for seed, kind in enumerate(["cr", "dx", "lateral", "ct", "cr2"]):
        make(kind, seed).save_as(os.path.join(out, f"{kind}.dcm"), enforce_file_format=True)
