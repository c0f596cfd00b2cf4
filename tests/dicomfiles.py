"""DICOM files written by the tests with pydicom: small, real, and as broken as a test needs."""

import itertools
from pathlib import Path

from pydicom import examples
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_counter = itertools.count(1)


def ct(study_uid=None, series_uid=None, sop_uid=None, patient_id="PAT001", rows=8, columns=8,
       **attributes) -> Dataset:
    """A small, complete CT image dataset (16-bit, explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.StudyDescription, ds.SeriesDescription = "Thorax", "Axial 1 mm"
    ds.PatientName, ds.PatientID = "Müller^Anna", patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 2, next(_counter)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(256)) * (rows * columns * 2 // 256) + bytes(rows * columns * 2 % 256)
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def write(path: Path, ds: Dataset | None = None, **kwargs) -> Path:
    """Write ``ds`` (default: a fresh CT) as a Part-10 file at ``path``, its file meta as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ds if ds is not None else ct(**kwargs)
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False)
    return path


def write_bare(path: Path, ds: Dataset | None = None, implicit=True) -> Path:
    """A dataset without preamble, 'DICM' or file meta, as old discs hold them."""
    from pydicom.filewriter import dcmwrite
    ds = ds if ds is not None else ct()
    del ds.file_meta
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return path


def bundled(name: str) -> Path:
    """A file pydicom ships: 'ct' / 'mr' examples or a test data file name."""
    if name in ("ct", "mr", "rgb_color", "jpeg2k", "palette_color", "overlay", "waveform", "rt_ss"):
        return Path(examples.get_path(name))
    return Path(get_testdata_file(name, download=False))
