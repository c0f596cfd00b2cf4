"""Write a small, realistic drop folder for trying dicom-watcher by hand.

Usage: python tools/make_sample_drop.py DEST     (e.g. sample_drop)

Everything is deterministic: UIDs are name-based (``2.25.<uuid5>``), dates are
fixed and the pixels are drawn from formulas, so running the script twice
gives byte-identical files. It rewrites only what it owns inside DEST
(``ct_series/``, ``mr/``, ``cdrom/``, ``broken/`` and ``README.md``).
"""

from __future__ import annotations

import math
import shutil
import struct
import sys
import tempfile
import uuid
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "dicom-watcher/sample-drop")
IMPLEMENTATION_UID = f"2.25.{uuid.uuid5(NAMESPACE, 'implementation').int}"
SIZE = 64  # rows and columns of every image
CT_STUDY = ("ct-study", "CT CHEST WITH CONTRAST")
CT_SERIES = ("ct-series", 2, "AXIAL 5mm")
OWNED = ("ct_series", "mr", "cdrom", "broken", "README.md")


def uid(label: str) -> str:
    """A stable UID for `label`: 2.25 followed by a name-based UUID."""
    return f"2.25.{uuid.uuid5(NAMESPACE, label).int}"


def phantom(slice_index: int, offset: int = 1024) -> bytes:
    """A 64x64 little-endian uint16 round phantom (HU + offset); slices differ."""
    centre = (SIZE - 1) / 2
    inner = 6 + 3 * math.sin(slice_index / 2)  # a "lesion" that changes size
    values = []
    for row in range(SIZE):
        for col in range(SIZE):
            r = math.hypot(row - centre, col - centre)
            lesion = math.hypot(row - 24, col - 38)
            if r > 28:
                hu = -1000  # air
            elif r > 25:
                hu = 900  # skull
            elif lesion < inner:
                hu = 70
            else:
                hu = 35 + (row * 3 + col) % 11  # tissue with some texture
            values.append(max(0, hu + offset))
    return struct.pack(f"<{len(values)}H", *values)


def image(patient: tuple[str, str], study: str, series: str, number: int) -> Dataset:
    """The attributes every sample image shares (patient, study, series, pixels)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPInstanceUID = uid(f"{series}/image/{number}")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240312"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"A{uuid.uuid5(NAMESPACE, study).int % 10**8:08d}"
    ds.Manufacturer = "dicom-watcher sample generator"
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(series)
    ds.StudyID = "1"
    ds.InstanceNumber = number
    ds.FrameOfReferenceUID = uid(f"{study}/frame-of-reference")
    ds.ImagePositionPatient = [-125.0, -125.0, -20.0 + 5.0 * number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = "5.0"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.PixelSpacing = [3.90625, 3.90625]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def ct_slice(patient: tuple[str, str], study: tuple[str, str], series: tuple[str, int, str],
             number: int) -> Dataset:
    """Slice `number`; study is (label, description), series (label, number, description)."""
    (study_label, study_description), (label, series_number, description) = study, series
    ds = image(patient, study_label, label, number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.StudyDescription = study_description
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.KVP = "120"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = phantom(number)
    return ds


def mr_slice(number: int) -> Dataset:
    """Slice `number` of the MR series (patient DEMO-0002)."""
    patient = ("DEMO^KNEE", "DEMO-0002")
    ds = image(patient, "mr-study", "mr-series", number)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.Modality = "MR"
    ds.StudyDescription = "MR KNEE LEFT"
    ds.SeriesDescription = "PD TSE SAG"
    ds.SeriesNumber = 4
    ds.ScanningSequence, ds.SequenceVariant = "SE", "SK"
    ds.ScanOptions, ds.MRAcquisitionType = "", "2D"
    ds.RepetitionTime, ds.EchoTime = "3000", "30"
    ds.MagneticFieldStrength = "1.5"
    ds.PixelData = phantom(number + 20, offset=1000)
    return ds


def with_file_meta(ds: Dataset) -> Dataset:
    """Attach a file meta for Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DCMWATCH_SAMPLE"
    ds.file_meta = meta
    return ds


def write_part10(ds: Dataset, path: Path) -> None:
    """A normal DICOM file: preamble, DICM, file meta, Explicit VR Little Endian."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with_file_meta(ds).save_as(path, enforce_file_format=True)


def write_ct_series(dest: Path) -> None:
    patient = ("DEMO^CHEST", "DEMO-0001")
    for n in range(1, 9):
        ds = ct_slice(patient, CT_STUDY, CT_SERIES, n)
        write_part10(ds, dest / "ct_series" / f"CT{n:06d}.dcm")


def write_mr(dest: Path) -> None:
    write_part10(mr_slice(1), dest / "mr" / "MR000001.dcm")
    # As old discs write: no preamble, no DICM, no file meta, Implicit VR LE.
    dcmwrite(dest / "mr" / "MR000002.dcm", mr_slice(2),
             implicit_vr=True, little_endian=True, enforce_file_format=False)


def write_cdrom(dest: Path) -> None:
    """A CD copy: DICOMDIR, 8-character names without extensions, junk files."""
    cd = dest / "cdrom"
    cd.mkdir(parents=True)
    fs = FileSet()
    fs.UID = uid("cdrom/file-set")
    fs.ID = "DEMO_CD"
    patient = ("DEMO^HEAD", "DEMO-0003")
    for series in (("cd-series-1", 2, "AXIAL 5mm"), ("cd-series-2", 3, "CORONAL 5mm")):
        for n in (1, 2):
            ds = ct_slice(patient, ("cd-study", "CT HEAD WITHOUT CONTRAST"), series, n)
            fs.add(with_file_meta(ds))
    fs.write(cd)
    (cd / "AUTORUN.INF").write_bytes(b"[autorun]\r\nopen=VIEWER\\VIEWER.EXE\r\nlabel=DEMO CD\r\n")
    (cd / "README.TXT").write_bytes(
        b"DEMO HOSPITAL - PATIENT CD\r\nInsert the disc and run VIEWER\\VIEWER.EXE.\r\n")
    (cd / "VIEWER").mkdir()
    (cd / "VIEWER" / "VIEWER.EXE").write_bytes(b"MZ\x90\x00 not a real viewer\r\n")


def write_truncated(dest: Path) -> None:
    """A ninth CT slice whose copy stopped half-way through its Pixel Data."""
    ds = ct_slice(("DEMO^CHEST", "DEMO-0001"), CT_STUDY, CT_SERIES, 9)
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.dcm"
        write_part10(ds, whole)
        data = whole.read_bytes()
    pixel_bytes = SIZE * SIZE * 2
    assert data.endswith(ds.PixelData) and len(ds.PixelData) == pixel_bytes
    cut = len(data) - pixel_bytes // 2
    (dest / "broken").mkdir(parents=True)
    (dest / "broken" / "truncated.dcm").write_bytes(data[:cut])


README = """\
# sample_drop

A small drop folder for trying dicom-watcher by hand. It is generated by
`python tools/make_sample_drop.py sample_drop`; do not edit it, rerun the script
(output is byte-identical from run to run). Images are 64x64, 16-bit, synthetic.

| path | what it is | expected outcome |
| --- | --- | --- |
| `ct_series/CT000001.dcm` .. `CT000008.dcm` | CT series, patient DEMO-0001, 8 slices, InstanceNumber 1..8 | imported |
| `mr/MR000001.dcm` | MR image, patient DEMO-0002, normal Part 10 file | imported |
| `mr/MR000002.dcm` | MR image, same series, bare Implicit VR LE dataset: no preamble, no `DICM`, no file meta (as old discs write) | imported |
| `cdrom/DICOMDIR` | index of the disc (Media Storage Directory Storage) | dicomdir: kept in the archive, byte-identical, never an instance; `discs` shows its 4 files arrived |
| `cdrom/PT000000/ST000000/SE000000/IM000000`, `IM000001` | CT, patient DEMO-0003, series 2, no file extension | imported |
| `cdrom/PT000000/ST000000/SE000001/IM000000`, `IM000001` | CT, patient DEMO-0003, series 3, no file extension | imported |
| `cdrom/AUTORUN.INF` | Windows autorun text | rejected not-dicom |
| `cdrom/README.TXT` | text | rejected not-dicom |
| `cdrom/VIEWER/VIEWER.EXE` | a few bytes pretending to be a viewer | rejected not-dicom |
| `broken/truncated.dcm` | ninth slice of the CT series, cut in the middle of its Pixel Data | rejected truncated (once unchanged for `incomplete_seconds`, or at once with `scan --final`) |

The 14 imported instances belong to 3 patients, 3 studies and 4 series.
"""


def build(dest: Path) -> None:
    """Write the sample drop into `dest`, replacing what an earlier run wrote."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        old = dest / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    write_ct_series(dest)
    write_mr(dest)
    write_cdrom(dest)
    write_truncated(dest)
    (dest / "README.md").write_text(README, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/make_sample_drop.py DEST")
    target = Path(sys.argv[1])
    build(target)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total} bytes, into {target}")
