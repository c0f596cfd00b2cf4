"""Deterministic corpora for the benchmark: ``small``, ``real`` and ``large``.

Each ``make_*`` writes files under ``dest`` and returns their paths in a stable order.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import struct
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_files

from .datasets import CT_SLOTS, ct_slot_values, ct_template, encode, multiframe_header

LOGGER = logging.getLogger(__name__)

CHUNK = 1 << 20
PIXEL_DATA_OW_HEADER = b"\xe0\x7f\x10\x00OW\x00\x00"  # (7FE0,0010), VR OW, 2 reserved bytes
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# pydicom's deliberately broken test files say so in their names.
BROKEN_NAME_MARKERS = ("bad", "trunc", "no_meta", "nometa", "missing")
TESTDATA_ROOT = Path(pydicom.data.__file__).parent / "test_files"


# --- small: many ~25 KB CT instances -------------------------------------------------------

def _slot_offsets(header: bytes) -> dict[str, list[int]]:
    """Where each placeholder sits (the SOP Instance UID twice: file meta and dataset)."""
    offsets = {}
    for name, placeholder in CT_SLOTS.items():
        needle, found, start = placeholder.encode(), [], 0
        while (at := header.find(needle, start)) >= 0:
            found.append(at)
            start = at + 1
        expected = 2 if name == "sop" else 1
        if len(found) != expected:
            raise RuntimeError(f"placeholder {name!r} found {len(found)} times, expected {expected}")
        offsets[name] = found
    return offsets


def small_instances(count: int, *, seed: int = 1, per_series: int = 100, series_per_study: int = 5,
                    studies_per_patient: int = 2, rows: int = 110, columns: int = 110):
    """Yield (relative path, bytes) of ``count`` CT instances patched from one encoded template.

    Layout: pat<P>/study<S>/series<E>/im<index>.dcm, ``per_series`` instances per series.
    """
    template = encode(ct_template(rows, columns))
    offsets = _slot_offsets(template[: len(template) - rows * columns * 2])
    for index in range(count):
        data = bytearray(template)
        values = ct_slot_values(seed, index, per_series, series_per_study, studies_per_patient)
        for name, value in values.items():
            encoded = value.encode()
            if len(encoded) != len(CT_SLOTS[name]):
                raise ValueError(f"{name}={value!r} does not fit in {len(CT_SLOTS[name])} bytes")
            for at in offsets[name]:
                data[at:at + len(encoded)] = encoded
        series = index // per_series
        study = series // series_per_study
        folder = Path(f"pat{study // studies_per_patient:03d}", f"study{study:04d}", f"series{series:04d}")
        yield folder / f"im{index:06d}.dcm", bytes(data)


def make_small(dest: Path, count: int = 20_000, *, seed: int = 1, **layout) -> list[Path]:
    """Write ``small_instances(count, seed=seed, **layout)`` under ``dest``; their paths, in order."""
    paths, made = [], set()
    for rel, data in small_instances(count, seed=seed, **layout):
        path = dest / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(data)
        paths.append(path)
    LOGGER.info("small: %d files of %d bytes in %s", count, len(data) if paths else 0, dest)
    return paths


# --- real: the files pydicom ships -----------------------------------------------------------

@dataclass
class TestdataSurvey:
    """Which of pydicom's test files make the ``real`` corpus, and why the others do not."""

    kept: list[Path] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sop_instance_uids: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    meta_uid_mismatches: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        shared = {uid: names for uid, names in self.sop_instance_uids.items() if len(names) > 1}
        return {
            "kept": len(self.kept),
            "skipped": {reason: len(names) for reason, names in self.skipped.items()},
            "distinct_sop_instance_uids": len(self.sop_instance_uids) - ("" in self.sop_instance_uids),
            "without_sop_instance_uid": len(self.sop_instance_uids.get("", [])),
            "files_sharing_a_sop_instance_uid": sum(len(names) for names in shared.values()),
            "media_storage_uid_differs": len(self.meta_uid_mismatches),
        }


def _relative_name(path: Path) -> str:
    return str(path.relative_to(TESTDATA_ROOT)) if path.is_relative_to(TESTDATA_ROOT) else path.name


def _skip_reason(path: Path, include_dicomdir: bool) -> tuple[str | None, str, str]:
    """(reason to skip or None, SOP Instance UID, Media Storage SOP Instance UID)."""
    if any(marker in path.name.lower() for marker in BROKEN_NAME_MARKERS):
        return "deliberately broken (name)", "", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except Exception as exc:  # anything dcmread refuses is not part of the corpus
        return f"dcmread fails: {type(exc).__name__}", "", ""
    if not include_dicomdir and ds.file_meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        return "DICOMDIR (an index, not an instance)", "", ""
    return None, str(ds.get("SOPInstanceUID", "")), str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))


def survey_testdata(include_dicomdir: bool = False) -> TestdataSurvey:
    """Sort ``get_testdata_files()`` into kept (readable Part-10, unique bytes) and skipped."""
    survey, first_by_hash = TestdataSurvey(), {}
    for path in sorted(Path(p) for p in get_testdata_files()):
        name = _relative_name(path)
        if not path.is_file():
            continue
        reason, sop_uid, meta_uid = _skip_reason(path, include_dicomdir)
        if reason is None:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in first_by_hash:
                reason = "duplicate bytes"
                name = f"{name} (= {first_by_hash[digest]})"
            first_by_hash.setdefault(digest, name)
        if reason:
            survey.skipped[reason].append(name)
            continue
        survey.kept.append(path)
        survey.sop_instance_uids[sop_uid].append(name)
        if sop_uid and sop_uid != meta_uid:
            survey.meta_uid_mismatches.append(name)
    return survey


def make_real(dest: Path, survey: TestdataSurvey | None = None) -> list[Path]:
    """Copy the surveyed test files, keeping their relative paths (DICOMDIR trees stay trees)."""
    survey = survey or survey_testdata()
    paths = []
    for source in survey.kept:
        target = dest / _relative_name(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        paths.append(target)
    LOGGER.info("real: %d files copied, skipped %s", len(paths), survey.summary()["skipped"])
    return paths


# --- large: multi-frame files streamed to disk -----------------------------------------------

def _pixel_chunks(seed: int, total: int):
    """Deterministic bytes, 1 MiB at a time: one random block, rotated differently per chunk."""
    block = random.Random(seed).randbytes(CHUNK)
    sent, chunk_index = 0, 0
    while sent < total:
        shift = (chunk_index * 4099) % CHUNK
        size = min(CHUNK, total - sent)
        yield (block[shift:] + block[:shift])[:size]
        sent += size
        chunk_index += 1


def make_large(dest: Path, sizes: tuple[int, ...] = (300_000_000,) * 3 + (2 << 30,), *,
               seed: int = 1, rows: int = 512, columns: int = 512) -> list[Path]:
    """One multi-frame 16-bit file per size (rounded down to whole frames), never in memory.

    The header comes from pydicom; the Pixel Data element header and the pixels are written
    by hand after it, 1 MiB at a time.
    """
    dest.mkdir(parents=True, exist_ok=True)
    frame_bytes = rows * columns * 2
    paths = []
    for index, size in enumerate(sizes):
        frames = max(1, size // frame_bytes)
        pixel_len = frames * frame_bytes
        if pixel_len > 0xFFFFFFFE:
            raise ValueError(f"{pixel_len} bytes do not fit a 32-bit Pixel Data length")
        path = dest / f"large{index:02d}_{frames}frames.dcm"
        with path.open("wb") as out:
            out.write(multiframe_header(seed, index, rows, columns, frames))
            out.write(PIXEL_DATA_OW_HEADER + struct.pack("<I", pixel_len))
            for chunk in _pixel_chunks(seed + index, pixel_len):
                out.write(chunk)
        paths.append(path)
        LOGGER.info("large: %s, %d frames, %d bytes", path.name, frames, path.stat().st_size)
    return paths


def check_native_pixel_data(path: Path) -> int:
    """Prove an Explicit VR Little Endian OW file ends with exactly Rows*Columns*Frames*2 bytes
    of Pixel Data. Reads the header with stop_before_pixels and 12 bytes; returns the length."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    expected = ds.Rows * ds.Columns * int(ds.get("NumberOfFrames", 1)) * ds.BitsAllocated // 8
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(size - expected - 12)
        element_header = f.read(12)
    if element_header != PIXEL_DATA_OW_HEADER + struct.pack("<I", expected):
        raise ValueError(f"{path}: {size} bytes do not end with {expected} bytes of Pixel Data")
    return expected
