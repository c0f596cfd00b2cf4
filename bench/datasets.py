"""The synthetic instances the corpora are made of: deterministic UIDs and encoded headers."""

from __future__ import annotations

import array
import hashlib
import io
import sys

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_WORD_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"

# 2.25.<n> with 10**38 <= n < 2**128: always 39 digits, so every UID is 44 characters.
_UID_FLOOR = 10**38
_UID_SPAN = 2**128 - _UID_FLOOR


def deterministic_uid(seed: int, kind: str, index: int) -> str:
    """A valid, fixed-length UID (2.25 arc) derived from seed, kind and index."""
    digest = hashlib.sha256(f"{seed}/{kind}/{index}".encode()).digest()
    return f"2.25.{_UID_FLOOR + int.from_bytes(digest[:16], 'big') % _UID_SPAN}"


def _placeholder_uid(digit: str) -> str:
    return "2.25." + digit * 39


# Values that change per file of the small corpus. The template carries these placeholders;
# each real value must have exactly the placeholder's length so it can be patched in place.
CT_SLOTS = {
    "sop": _placeholder_uid("1"),
    "series": _placeholder_uid("2"),
    "study": _placeholder_uid("3"),
    "frame": _placeholder_uid("4"),
    "patient_id": "QPIDQPIDQP",
    "patient_name": "QNAME^QNAME^",
    "study_id": "QSTUDY",
    "accession": "QACCESSN",
    "series_number": "8364",
    "instance_number": "729183",
    "z": "-6543.21",
    "slice_location": "-5432.19",
}


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _add_common_attributes(ds: Dataset, modality: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = "BENCH^REFERRER"
    ds.StudyDescription = "dicom-watcher benchmark"
    ds.SeriesDescription = "synthetic"
    ds.Modality = modality
    ds.Manufacturer = "dicom-watcher bench"
    ds.InstitutionName = "Benchmark"
    ds.PositionReferenceIndicator = ""


def _add_grey_16bit_image(ds: Dataset, rows: int, columns: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.5]


def ct_template(rows: int, columns: int) -> Dataset:
    """A complete CT instance whose per-file values are the CT_SLOTS placeholders."""
    ds = Dataset()
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, CT_SLOTS["sop"])
    _add_common_attributes(ds, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = CT_SLOTS["sop"]
    ds.StudyInstanceUID = CT_SLOTS["study"]
    ds.SeriesInstanceUID = CT_SLOTS["series"]
    ds.FrameOfReferenceUID = CT_SLOTS["frame"]
    ds.PatientName = CT_SLOTS["patient_name"]
    ds.PatientID = CT_SLOTS["patient_id"]
    ds.StudyID = CT_SLOTS["study_id"]
    ds.AccessionNumber = CT_SLOTS["accession"]
    ds.SeriesNumber = CT_SLOTS["series_number"]
    ds.InstanceNumber = CT_SLOTS["instance_number"]
    ds.ImagePositionPatient = ["-27.50", "-27.50", CT_SLOTS["z"]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = CT_SLOTS["slice_location"]
    ds.SliceThickness = "2.5"
    ds.KVP = "120"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    _add_grey_16bit_image(ds, rows, columns)
    pixels = array.array("H", ((r * 37 + c * 11) % 4096 for r in range(rows) for c in range(columns)))
    if sys.byteorder == "big":
        pixels.byteswap()
    ds.PixelData = pixels.tobytes()
    return ds


def ct_slot_values(seed: int, index: int, per_series: int, series_per_study: int,
                   studies_per_patient: int) -> dict[str, str]:
    """The CT_SLOTS values of instance ``index``: series, study and patient follow from it."""
    series, position = divmod(index, per_series)
    study = series // series_per_study
    patient = study // studies_per_patient
    z = -2.5 * position + 0.0  # no "-0.00"
    return {
        "sop": deterministic_uid(seed, "sop", index),
        "series": deterministic_uid(seed, "series", series),
        "study": deterministic_uid(seed, "study", study),
        "frame": deterministic_uid(seed, "frame", series),
        "patient_id": f"BENCH{patient:05d}",
        "patient_name": f"BENCH^P{patient:05d}",
        "study_id": f"S{study:05d}",
        "accession": f"A{study:07d}",
        "series_number": f"{series % series_per_study + 1:>4}",
        "instance_number": f"{position + 1:>6}",
        "z": f"{z:>8.2f}",
        "slice_location": f"{z:>8.2f}",
    }


def multiframe_header(seed: int, index: int, rows: int, columns: int, frames: int) -> bytes:
    """Part-10 bytes of a multi-frame 16-bit instance up to, not including, its Pixel Data."""
    sop = deterministic_uid(seed, "large-sop", index)
    ds = Dataset()
    ds.file_meta = _file_meta(MULTIFRAME_WORD_SC_STORAGE, sop)
    _add_common_attributes(ds, "OT")
    ds.SOPClassUID = MULTIFRAME_WORD_SC_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = deterministic_uid(seed, "large-study", 0)
    ds.SeriesInstanceUID = deterministic_uid(seed, "large-series", index)
    ds.PatientName, ds.PatientID = "BENCH^LARGE", "BENCHLARGE"
    ds.StudyID, ds.AccessionNumber = "L1", "L0000001"
    ds.SeriesNumber, ds.InstanceNumber = index + 1, 1
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = frames
    _add_grey_16bit_image(ds, rows, columns)
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    return encode(ds)


def encode(ds: Dataset) -> bytes:
    """The dataset as a Part-10 file (preamble, DICM, file meta), in memory."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
