"""Build a corpus of hostile and odd files, each with the outcome the watcher should reach.

Usage: python tools/hostile_corpus.py DEST      (DEST must be absent or empty)
In tests: ``cases = build(tmp_path / "drop")``; each Case says where its file is and
what importing it should give. Files are deterministic; every entry gets the same
fixed mtime (``mtime=None`` keeps the real one). Expectations for truncated files
assume the settle window has passed. A ``duplicate`` or ``conflict`` case is named
``zz_...`` so that, in sorted order, it comes after the file it collides with.
"""

from __future__ import annotations

import copy
import io
import os
import random
import socket
import stat
import struct
import sys
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import tag_for_keyword
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.fileset import FileSet
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)

EXPECTS = ("imported", "duplicate", "dicomdir", "rejected", "ignored", "pending")
REASONS = ("not-dicom", "truncated", "malformed", "missing-attribute", "invalid-uid",
           "meta-mismatch", "conflict", "unreadable", "symlink", "special-file", "error")
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "dicom-watcher/hostile-corpus")
MTIME = 1_704_067_200  # 2024-01-01 00:00:00 UTC
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
PREAMBLE = b"\x00" * 128 + b"DICM"
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Case:
    name: str
    relpath: str
    expect: str
    reason: str | None
    note: str


def uid(label: str) -> str:
    return f"2.25.{uuid.uuid5(NAMESPACE, label).int}"


# --- datasets and their encodings -------------------------------------------

def ct(label: str, rows: int = 16, cols: int = 16, bits: int = 16, frames: int = 1) -> Dataset:
    """A small but complete CT image (no file meta); `label` makes its UIDs."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_STORAGE
    ds.SOPInstanceUID = uid(f"instance/{label}")
    ds.StudyDate, ds.StudyTime = "20240101", "120000"
    ds.AccessionNumber = "HOSTILE1"
    ds.Modality = "CT"
    ds.StudyDescription = f"hostile corpus: {label}"
    ds.SeriesDescription = "hostile corpus"
    ds.PatientName, ds.PatientID = "HOSTILE^CORPUS", "HOSTILE-1"
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 12), min(bits, 12) - 1
    ds.PixelRepresentation = 0
    count = rows * cols * frames
    ds.PixelData = (struct.pack(f"<{count}H", *(i * 37 % 4096 for i in range(count)))
                    if bits == 16 else bytes(i * 7 % 256 for i in range(count)))
    return ds


def put(ds: Dataset, keyword: str, value: str) -> None:
    """Set a UI element without pydicom's validation (to store invalid UIDs)."""
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, "UI", value, validation_mode=config.IGNORE)


def encode_meta(ds: Dataset, ts: str, **overrides: str) -> bytes:
    """Preamble, DICM and a file meta for `ds`; keyword overrides replace values."""
    meta = FileMetaDataset()
    put(meta, "MediaStorageSOPClassUID", ds.get("SOPClassUID", CT_STORAGE))
    put(meta, "MediaStorageSOPInstanceUID", ds.get("SOPInstanceUID", uid("no-instance")))
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = uid("implementation")
    meta.ImplementationVersionName = "DCMWATCH_HOSTILE"
    for keyword, value in overrides.items():
        put(meta, keyword, value)
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    return PREAMBLE + fp.getvalue()


def encode_body(ds: Dataset, ts: str) -> bytes:
    """The dataset alone, encoded as `ts` says (native and RLE syntaxes, deflate)."""
    if ts == ExplicitVRBigEndian and ds.get("BitsAllocated") == 16:
        ds = copy.deepcopy(ds)
        words = struct.unpack(f"<{len(ds.PixelData) // 2}H", ds.PixelData)
        ds.PixelData = struct.pack(f">{len(words)}H", *words)  # OW is not swapped for us
    fp = DicomBytesIO()
    fp.is_little_endian = ts != ExplicitVRBigEndian
    fp.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    body = fp.getvalue()
    if ts == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        body = deflater.compress(body) + deflater.flush()
        body += b"\x00" * (len(body) % 2)
    return body


def part10(ds: Dataset, ts: str = ExplicitVRLittleEndian, **meta: str) -> bytes:
    return encode_meta(ds, ts, **meta) + encode_body(ds, ts)


def dataset_start(data: bytes) -> int:
    if data[128:132] != b"DICM":
        return 0  # a bare dataset
    (group_length,) = struct.unpack_from("<I", data, 140)
    return 144 + group_length


def walk(data: bytes, pos: int, implicit: bool = False):
    """Yield (tag, header offset, value offset, length) of top-level LE elements."""
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if implicit:
            length, value = struct.unpack_from("<I", data, pos + 4)[0], pos + 8
        elif data[pos + 4:pos + 6] in LONG_VRS:
            length, value = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        yield group << 16 | element, pos, value, length
        if length == 0xFFFFFFFF:
            return
        pos = value + length


def locate(data: bytes, tag: int, implicit: bool = False, start: int | None = None):
    start = dataset_start(data) if start is None else start
    for found, header, value, length in walk(data, start, implicit):
        if found == tag:
            return header, value, length
    raise KeyError(f"{tag:08X} not found")


def patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a defined length."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def marker(tag: int, length: int = 0) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)


def sequence(tag: int, body: bytes) -> bytes:
    """An undefined-length SQ holding one undefined-length item, both delimited."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ" + struct.pack("<HI", 0, 0xFFFFFFFF)
    return head + marker(ITEM, 0xFFFFFFFF) + body + marker(ITEM_END) + marker(SEQ_END)


def nested(depth: int) -> bytes:
    """Content Sequence inside Content Sequence, `depth` levels, innermost a text."""
    body = element(0x0040A040, b"CS", b"TEXT") + element(0x0040A160, b"UT", b"deep")
    for _ in range(depth):
        body = sequence(0x0040A730, body)
    return body


def splice(data: bytes, before: int, blob: bytes) -> tuple[bytes, int]:
    """Insert `blob` just before the element `before`; return the data and where."""
    at = locate(data, before)[0]
    return data[:at] + blob + data[at:], at


def rle_frame(ds: Dataset) -> bytes:
    """RLE Lossless of 16-bit pixels: two segments (high, low bytes), literal runs."""
    cols = ds.Columns
    words = struct.unpack(f"<{len(ds.PixelData) // 2}H", ds.PixelData)
    segments = []
    for shift in (8, 0):
        plane = bytes((w >> shift) & 0xFF for w in words)
        rows = (plane[r:r + cols] for r in range(0, len(plane), cols))
        segment = b"".join(bytes([len(row) - 1]) + row for row in rows)  # cols <= 128
        segments.append(segment + b"\x00" * (len(segment) % 2))
    offsets = [64, 64 + len(segments[0])]
    header = struct.pack("<16I", len(segments), *offsets, *[0] * 13)
    return header + b"".join(segments)


# --- the corpus ---------------------------------------------------------------

class Corpus:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.cases: list[Case] = []

    def path(self, relpath: str) -> Path:
        path = self.dest / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, relpath: str, data: bytes | None, expect: str,
            reason: str | None = None, note: str = "") -> Path:
        """Record a case; write `data` to it unless None (the caller makes the entry)."""
        assert expect in EXPECTS and (reason in REASONS) == (expect == "rejected"), name
        assert all(case.name != name for case in self.cases), name
        path = self.path(relpath)
        if data is not None:
            path.write_bytes(data)
        self.cases.append(Case(name, relpath, expect, reason, note))
        return path

    def reject(self, name: str, relpath: str, data: bytes | None, reason: str,
               note: str = "") -> Path:
        return self.add(name, relpath, data, "rejected", reason, note)


def tiny_png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


def zip_of(name: str, data: bytes) -> bytes:
    fp = io.BytesIO()
    with zipfile.ZipFile(fp, "w") as archive:
        archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return fp.getvalue()


def add_not_dicom(c: Corpus, valid: bytes, sparse: bool) -> None:
    c.reject("empty", "empty.dcm", b"", "not-dicom", "0 bytes")
    c.reject("one_byte", "one_byte.dcm", b"\x08", "not-dicom", "1 byte, 0x08")
    c.reject("bytes_131", "bytes_131.dcm", PREAMBLE[:131], "not-dicom", "preamble + 'DIC', 131 bytes")
    noise = random.Random(20240101).randbytes(4096)
    c.reject("random_bytes", "random.bin", noise, "not-dicom", "4096 seeded random bytes")
    c.reject("png", "image.png", tiny_png(), "not-dicom", "a 1x1 grey PNG")
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    c.reject("pdf", "report.pdf", pdf, "not-dicom", "a minimal PDF")
    c.reject("zip", "images.zip", zip_of("valid_ct.dcm", valid), "not-dicom",
             "a ZIP holding a copy of valid_ct.dcm; archives are not unpacked")
    c.reject("text", "notes.txt", b"Patient CD - please import.\n", "not-dicom", "plain text")
    c.reject("html_named_dcm", "report.dcm", b"<html><body>404</body></html>\n", "not-dicom",
             "HTML with a .dcm extension")
    c.reject("wrong_magic", "wrong_magic.dcm", PREAMBLE[:128] + b"DICN" + part10(ct("wrong magic"))[132:], "not-dicom",
             "preamble + 'DICN' + a valid meta and dataset")
    if sparse:
        path = c.reject("sparse_2gib", "sparse_2gib.dcm", None, "not-dicom",
                        "2 GiB of zeros, sparse (made with truncate)")
        with open(path, "wb") as fp:
            fp.truncate(2 << 30)


def add_truncated(c: Corpus) -> None:
    ds = ct("truncated")
    data = part10(ds)
    c.reject("preamble_only", "preamble_only.dcm", PREAMBLE, "truncated", "preamble + DICM, nothing after")
    header, value, length = locate(data, 0x00100010)  # Patient Name
    c.reject("cut_in_element_header", "cut_header.dcm", data[:header + 5], "truncated",
             "ends 5 bytes into Patient Name's 8-byte header")
    header, value, length = locate(data, 0x00081030)  # Study Description
    c.reject("cut_in_value", "cut_value.dcm", data[:value + length // 2], "truncated",
             "ends in the middle of Study Description's value")
    header, value, length = locate(data, 0x7FE00010)
    assert length == 512 and value + length == len(data)
    c.reject("cut_in_pixel_data", "cut_pixels.dcm", data[:value + 200], "truncated",
             "Pixel Data declares 512 bytes, 200 present")
    short = ct("short pixels")
    short.PixelData = short.PixelData[:256]
    c.reject("pixel_data_short", "short_pixels.dcm", part10(short), "truncated",
             "complete element, but 256 of 16*16*2 = 512 bytes")
    frames = ct("short frames", frames=3)
    frames.PixelData = frames.PixelData[:512]
    c.reject("frames_short", "short_frames.dcm", part10(frames), "truncated",
             "NumberOfFrames 3, Pixel Data holds one frame")
    bare = ct("no pixels")
    del bare.PixelData
    c.reject("pixel_data_absent", "no_pixels.dcm", part10(bare), "truncated",
             "Rows/Columns but no Pixel Data: a copy stopped at an element boundary")
    refs = (element(0x00081150, b"UI", CT_STORAGE.encode())
            + element(0x00081155, b"UI", uid("referenced").encode()))
    seq = sequence(0x00081140, refs)  # Referenced Image Sequence, undefined lengths
    full, at = splice(part10(ct("sequence cuts")), 0x00100010, seq)
    c.reject("cut_in_sequence_item", "cut_sequence_item.dcm", full[:at + 30], "truncated",
             "ends inside the first element of an undefined-length item")
    c.reject("item_without_delimiter", "item_no_delimiter.dcm", full[:at + 20 + len(refs)],
             "truncated", "ends after the item's last element; no item or sequence delimiter")
    assert full[at + len(seq) - 8:at + len(seq)] == marker(SEQ_END)
    c.reject("sequence_without_delimiter", "sequence_no_delimiter.dcm", full[:at + len(seq) - 8],
             "truncated", "ends after the item delimiter; no sequence delimiter")
    rle = rle_file("rle cuts")
    header, value, length = locate(rle, 0x7FE00010)
    assert length == 0xFFFFFFFF and rle.endswith(marker(SEQ_END))
    c.reject("cut_in_fragment", "cut_fragment.dcm", rle[:value + 12 + 8 + 100], "truncated",
             "RLE: ends 100 bytes into the 608-byte fragment")
    c.reject("encapsulated_without_delimiter", "encaps_no_delimiter.dcm", rle[:-8], "truncated",
             "RLE: all fragments present, sequence delimiter missing")
    absurd = part10(ct("absurd lengths"))
    header, value, length = locate(absurd, 0x00020001, start=132)  # File Meta Info Version, OB
    c.reject("absurd_length_ob", "absurd_ob.dcm", patch(absurd, header + 8, b"\xfe\xff\xff\xff"),
             "truncated", "File Meta Information Version (OB) declares 0xFFFFFFFE bytes")
    header, value, length = locate(absurd, 0x7FE00010)
    c.reject("absurd_length_pixel_data", "absurd_pixels.dcm",
             patch(absurd, header + 8, b"\xfe\xff\xff\xff"), "truncated",
             "Pixel Data (OW) declares 0xFFFFFFFE bytes")
    implicit = part10(ct("absurd string"), ImplicitVRLittleEndian)
    header, value, length = locate(implicit, 0x00081030, implicit=True)
    c.reject("absurd_length_string", "absurd_string.dcm",
             patch(implicit, header + 4, b"\xfe\xff\xff\xff"), "truncated",
             "Implicit VR: Study Description (LO) declares 0xFFFFFFFE bytes")


def rle_file(label: str) -> bytes:
    ds = ct(label)
    ds.PixelData = encapsulate([rle_frame(ds)])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return part10(ds, RLELossless)


def add_malformed(c: Corpus) -> None:
    for name, vr in (("invalid_vr_letters", b"QQ"), ("invalid_vr_zero", b"\x00\x00")):
        data = part10(ct(name))
        header = locate(data, 0x00081030)[0]
        c.reject(name, f"{name}.dcm", patch(data, header + 4, vr), "malformed",
                 f"Study Description's VR is {vr!r}")
    data, at = splice(part10(ct("stray delimiter")), 0x00100010, marker(ITEM_END))
    c.reject("item_delimiter_at_top_level", "stray_delimiter.dcm", data, "malformed",
             "an Item Delimitation Item between two top-level elements")
    data, at = splice(part10(ct("nested 300")), 0x7FE00010, nested(300))
    c.reject("nested_300_deep", "nested_300.dcm", data, "malformed",
             "Content Sequence nested 300 deep, all delimited")
    ds = ct("meta explicit, data implicit")
    c.reject("ts_says_explicit_is_implicit", "ts_explicit_is_implicit.dcm",
             encode_meta(ds, ExplicitVRLittleEndian) + encode_body(ds, ImplicitVRLittleEndian),
             "malformed", "meta: Explicit VR LE; dataset: Implicit VR LE")
    ds = ct("meta implicit, data explicit")
    c.reject("ts_says_implicit_is_explicit", "ts_implicit_is_explicit.dcm",
             encode_meta(ds, ImplicitVRLittleEndian) + encode_body(ds, ExplicitVRLittleEndian),
             "malformed", "meta: Implicit VR LE; dataset: Explicit VR LE")


def add_identity_problems(c: Corpus) -> None:
    c.reject("meta_only", "meta_only.dcm", encode_meta(ct("meta only"), ExplicitVRLittleEndian),
             "missing-attribute", "preamble + DICM + file meta, no dataset")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds = ct(f"missing {keyword}")
        del ds[keyword]
        c.reject(f"missing_{keyword}", f"missing_{keyword}.dcm", part10(ds), "missing-attribute",
                 f"{keyword} absent (the file meta keeps its own value)")
    ds = ct("empty instance uid")
    put(ds, "SOPInstanceUID", "")
    c.reject("empty_SOPInstanceUID", "empty_SOPInstanceUID.dcm", part10(ds), "missing-attribute",
             "SOP Instance UID present with zero length")
    bad = (("uid_too_long", "SOPInstanceUID", "1.2.840." + "1" * 57),
           ("uid_letters", "StudyInstanceUID", "1.2.840.abc.1"),
           ("uid_empty_component", "SeriesInstanceUID", "1.2..3"),
           ("uid_leading_zero", "SOPInstanceUID", "1.2.840.02"),
           ("uid_trailing_dot", "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2."))
    for name, keyword, value in bad:
        ds = ct(name)
        put(ds, keyword, value)
        c.reject(name, f"{name}.dcm", part10(ds), "invalid-uid",
                 f"{keyword} = {value!r} ({len(value)} chars); the file meta agrees")
    ds = ct("meta mismatch")
    c.reject("meta_sop_instance_mismatch", "meta_mismatch.dcm",
             part10(ds, MediaStorageSOPInstanceUID=uid("someone else")), "meta-mismatch",
             "Media Storage SOP Instance UID differs from SOP Instance UID")


def add_valid(c: Corpus) -> bytes:
    """Files that must import, in every encoding and under awkward names."""
    valid = part10(ct("valid"))
    c.add("valid_ct", "valid_ct.dcm", valid, "imported", note="the reference file")
    c.add("implicit_with_meta", "implicit.dcm", part10(ct("implicit"), ImplicitVRLittleEndian),
          "imported", note="Part 10, Implicit VR LE")
    c.add("bare_implicit", "bare_implicit.dcm", encode_body(ct("bare"), ImplicitVRLittleEndian),
          "imported", note="no preamble, no DICM, no meta: Implicit VR LE dataset")
    c.add("big_endian", "big_endian.dcm", part10(ct("big endian"), ExplicitVRBigEndian),
          "imported", note="Explicit VR Big Endian (retired), pixels byte-swapped")
    c.add("deflated", "deflated.dcm", part10(ct("deflated"), DeflatedExplicitVRLittleEndian),
          "imported", note="Deflated Explicit VR LE")
    c.add("rle_lossless", "rle.dcm", rle_file("rle"), "imported", note="encapsulated RLE Lossless")
    frames = ct("multi-frame", frames=3)
    frames.SOPClassUID, frames.Modality = "1.2.840.10008.5.1.4.1.1.7.3", "OT"
    c.add("multi_frame", "multi_frame.dcm", part10(frames), "imported", note="3 frames, complete")
    odd = ct("odd length", rows=3, cols=3, bits=8)
    odd.SOPClassUID, odd.Modality = "1.2.840.10008.5.1.4.1.1.7", "OT"
    c.add("odd_pixel_length", "odd_pixels.dcm", part10(odd), "imported",
          note="3x3 8-bit: 9 bytes of pixels padded to 10")
    data, at = splice(part10(ct("nested 10")), 0x7FE00010, nested(10))
    c.add("nested_10_deep", "nested_10.dcm", data, "imported", note="Content Sequence 10 deep")
    names = (("name_unicode", "ünïcødé_画像.dcm"), ("name_spaces", "name with  spaces .dcm"),
             ("name_newline", "new\nline.dcm"), ("name_leading_dash", "-rf.dcm"),
             ("name_255_bytes", "n" * 251 + ".dcm"), ("name_latin1_bytes", "caf\udce9.dcm"),
             ("no_extension", "IMG00001"), ("deep_path", "/".join(f"d{i:02d}" for i in range(12))
                                            + "/IMG00001"))
    for name, relpath in names:
        c.add(name, relpath, part10(ct(name)), "imported", note=f"file name {relpath!a}")
    fs = FileSet()
    fs.UID, fs.ID = uid("file-set"), "HOSTILE"
    ds = ct("on cd")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = uid("implementation")
    ds.file_meta.ImplementationVersionName = "DCMWATCH_HOSTILE"
    fs.add(ds)
    fs.write(c.path("cd/DICOMDIR").parent)
    c.add("dicomdir", "cd/DICOMDIR", None, "dicomdir", note="written by pydicom FileSet")
    c.add("cd_image", "cd/PT000000/ST000000/SE000000/IM000000", None, "imported",
          note="the image cd/DICOMDIR lists")
    return valid


def add_collisions(c: Corpus, valid: bytes) -> None:
    c.add("duplicate", "zz_duplicate_of_valid_ct.dcm", valid, "duplicate",
          note="same bytes as valid_ct.dcm; must come after it")
    ds = ct("valid")
    ds.PatientName = "CORRECTED^NAME"
    c.reject("conflict", "zz_conflict_with_valid_ct.dcm", part10(ds), "conflict",
             "SOP Instance UID of valid_ct.dcm, another Patient Name; must come after it")


def add_filesystem_oddities(c: Corpus) -> None:
    c.add("partial_download", "x.part", part10(ct("part")), "ignored", note="valid DICOM, .part name")
    c.add("hidden", ".hidden", part10(ct("hidden")), "ignored", note="valid DICOM, dot name")
    outside = get_testdata_file("CT_small.dcm")
    links = (("symlink_outside_file", "link_outside.dcm", outside, "pydicom's CT_small.dcm"),
             ("symlink_outside_dir", "link_outside_dir", str(Path(outside).parent),
              "pydicom's test_files folder"),
             ("symlink_inside_file", "link_inside.dcm", "valid_ct.dcm", "valid_ct.dcm"),
             ("symlink_inside_dir", "link_inside_dir", "d00", "the deep_path tree"),
             ("symlink_dangling", "link_dangling.dcm", "missing.dcm", "nothing"),
             ("symlink_loop_a", "loop_a", "loop_b", "loop_b -> loop_a"),
             ("symlink_loop_b", "loop_b", "loop_a", "loop_a -> loop_b"),
             ("symlink_self", "loop_self", "loop_self", "itself"))
    for name, relpath, target, what in links:
        c.reject(name, relpath, None, "symlink", f"points to {what}").symlink_to(target)
    os.mkfifo(c.reject("fifo", "pipe.dcm", None, "special-file", "a FIFO; opening it would block"))
    make_socket(c)
    if os.geteuid() == 0:
        try:
            os.mknod(c.path("null.dcm"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
            c.reject("device", "null.dcm", None, "special-file", "char device 1,3; made as root")
        except OSError:
            pass  # a container without CAP_MKNOD
    else:
        path = c.reject("unreadable", "unreadable.dcm", part10(ct("unreadable")), "unreadable",
                        "valid DICOM, mode 000; only made when not running as root")
        path.chmod(0)


def make_socket(c: Corpus) -> None:
    path = c.path("socket.dcm")
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.bind(str(path))
        except OSError:  # path too long for AF_UNIX: bind through the folder's fd
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                sock.bind(f"/proc/self/fd/{fd}/{path.name}")
            except OSError:
                return
            finally:
                os.close(fd)
    c.reject("socket", "socket.dcm", None, "special-file", "a Unix socket (no listener)")


def build(dest: Path, *, sparse: bool = True, mtime: int | None = MTIME) -> list[Case]:
    """Create the corpus in `dest` (absent or empty) and return its cases."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; give an empty or new folder")
    c = Corpus(dest)
    valid = add_valid(c)
    add_not_dicom(c, valid, sparse)
    add_truncated(c)
    add_malformed(c)
    add_identity_problems(c)
    add_collisions(c, valid)
    add_filesystem_oddities(c)
    if mtime is not None:
        for root, dirs, files in os.walk(dest, topdown=False):
            for name in files + dirs + ["."]:
                os.utime(os.path.join(root, name), (mtime, mtime), follow_symlinks=False)
    return c.cases


def check(dest: Path, cases: list[Case]) -> None:
    """Check that each entry is the kind of thing its case says."""
    import pydicom  # only the self-check reads files back

    for case in cases:
        mode = os.lstat(dest / case.relpath).st_mode
        if case.reason == "symlink":
            assert stat.S_ISLNK(mode), case.name
        elif case.reason == "special-file":
            assert stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode), case.name
        else:
            assert stat.S_ISREG(mode), case.name
        if case.expect in ("imported", "duplicate"):
            ds = pydicom.dcmread(dest / case.relpath, force=case.name == "bare_implicit")
            assert ds.SOPInstanceUID and ds.StudyInstanceUID and ds.SeriesInstanceUID
            if "TransferSyntaxUID" not in ds.get("file_meta", {}) or \
                    not ds.file_meta.TransferSyntaxUID.is_compressed:
                expected = ds.Rows * ds.Columns * ds.BitsAllocated // 8 * ds.get("NumberOfFrames", 1)
                assert len(ds.PixelData) == expected + expected % 2, case.name


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/hostile_corpus.py DEST")
    target = Path(sys.argv[1])
    built = build(target)
    check(target, built)
    for case in built:
        outcome = case.expect + (f" {case.reason}" if case.reason else "")
        print(f"{case.name:32} {outcome:28} {ascii(case.relpath)[:50]:52} {case.note}")
    print(f"{len(built)} cases in {target}")
