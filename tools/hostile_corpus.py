"""Build a corpus of hostile and odd files, each with the outcome the watcher should reach.

Usage: python tools/hostile_corpus.py DEST      (DEST must be absent or empty)
In tests: ``cases = build(tmp_path / "drop")``. Files are deterministic and every
entry gets the same old mtime (``mtime=None`` keeps the real one). Expectations
for incomplete files assume the settle window has passed. A ``duplicate`` or
``conflict`` case is named ``zz_...``: in sorted order it comes after the file it
collides with (``valid_ct.dcm``), which must be imported first.
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
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
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
PATIENT_NAME, STUDY_DESCRIPTION, PIXEL_DATA = 0x00100010, 0x00081030, 0x7FE00010
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HUGE = struct.pack("<I", 0xFFFFFFFE)
EXPLICIT, IMPLICIT = ExplicitVRLittleEndian, ImplicitVRLittleEndian


@dataclass(frozen=True)
class Case:
    name: str
    relpath: str
    expect: str
    reason: str | None
    note: str


def uid(label: str) -> str:
    return f"2.25.{uuid.uuid5(NAMESPACE, label).int}"


# --- datasets and their encodings --------------------------------------------

def ct(label: str, rows: int = 16, cols: int = 16, bits: int = 16, frames: int = 1) -> Dataset:
    """A small but complete CT image (no file meta); `label` makes its SOP Instance UID."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, uid(f"instance/{label}")
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "120000", "HOSTILE1"
    ds.Modality = "CT"
    ds.StudyDescription, ds.SeriesDescription = f"hostile corpus: {label}", "hostile corpus"
    ds.PatientName, ds.PatientID = "HOSTILE^CORPUS", "HOSTILE-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
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
    """Set a UI element without pydicom's validation (so invalid UIDs can be stored)."""
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, "UI", value, validation_mode=config.IGNORE)


def file_meta(ds: Dataset, ts: str, **overrides: str) -> FileMetaDataset:
    """The file meta for `ds`; keyword arguments replace values."""
    meta = FileMetaDataset()
    put(meta, "MediaStorageSOPClassUID", ds.get("SOPClassUID") or CT_STORAGE)
    put(meta, "MediaStorageSOPInstanceUID", ds.get("SOPInstanceUID") or uid("no-instance"))
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = uid("implementation")
    meta.ImplementationVersionName = "DCMWATCH_HOSTILE"
    for keyword, value in overrides.items():
        put(meta, keyword, value)
    return meta


def encode_meta(ds: Dataset, ts: str, **overrides: str) -> bytes:
    """Preamble, DICM and the file meta for `ds`."""
    fp = DicomBytesIO()
    write_file_meta_info(fp, file_meta(ds, ts, **overrides), enforce_standard=True)
    return PREAMBLE + fp.getvalue()


def encode_body(ds: Dataset, ts: str) -> bytes:
    """The dataset alone, encoded as transfer syntax `ts` says (deflating if it says so)."""
    if ts == ExplicitVRBigEndian and ds.BitsAllocated == 16:
        ds = copy.deepcopy(ds)  # pydicom writes OW as given: swap the words ourselves
        words = struct.unpack(f"<{len(ds.PixelData) // 2}H", ds.PixelData)
        ds.PixelData = struct.pack(f">{len(words)}H", *words)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = ts != ExplicitVRBigEndian, ts == IMPLICIT
    write_dataset(fp, ds)
    body = fp.getvalue()
    if ts == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        body = deflater.compress(body) + deflater.flush()
        body += b"\x00" * (len(body) % 2)
    return body


def part10(ds: Dataset, ts: str = EXPLICIT, **meta: str) -> bytes:
    return encode_meta(ds, ts, **meta) + encode_body(ds, ts)


def rle_file(label: str) -> bytes:
    """A CT image in RLE Lossless: two segments (high, low bytes) of literal runs."""
    ds = ct(label)
    words = struct.unpack(f"<{len(ds.PixelData) // 2}H", ds.PixelData)
    segments = []
    for shift in (8, 0):
        plane = bytes((w >> shift) & 0xFF for w in words)
        rows = [plane[r:r + ds.Columns] for r in range(0, len(plane), ds.Columns)]
        segments.append(b"".join(bytes([len(row) - 1]) + row for row in rows))  # even length
    header = struct.pack("<16I", 2, 64, 64 + len(segments[0]), *[0] * 13)
    ds.PixelData = encapsulate([header + b"".join(segments)])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return part10(ds, RLELossless)


# --- finding and editing bytes -------------------------------------------------

def walk(data: bytes, pos: int, implicit: bool = False):
    """Yield (tag, header offset, value offset, length) of top-level LE elements."""
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if implicit:
            length, value = struct.unpack_from("<I", data, pos + 4)[0], pos + 8
        elif data[pos + 4:pos + 6] in LONG_VRS:
            length, value = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        yield group << 16 | elem, pos, value, length
        if length == 0xFFFFFFFF:
            return
        pos = value + length


def locate(data: bytes, tag: int, implicit: bool = False) -> tuple[int, int, int]:
    """(header offset, value offset, length) of `tag` in a Part 10 file."""
    start = 132 if tag >> 16 == 2 else 144 + struct.unpack_from("<I", data, 140)[0]
    for found, header, value, length in walk(data, start, implicit and tag >> 16 != 2):
        if found == tag:
            return header, value, length
    raise KeyError(f"{tag:08X}")


def patched(data: bytes, tag: int, offset: int, new: bytes, implicit: bool = False) -> bytes:
    """`data` with `new` written over it, `offset` bytes into element `tag`'s header."""
    at = locate(data, tag, implicit)[0] + offset
    return data[:at] + new + data[at + len(new):]


def cut(label: str, tag: int, where) -> bytes:
    """A valid file ending at where(header, value, length) of element `tag`."""
    data = part10(ct(label))
    return data[:where(*locate(data, tag))]


def splice(data: bytes, before: int, blob: bytes) -> tuple[bytes, int]:
    """Insert `blob` just before element `before`; return the bytes and where it went."""
    at = locate(data, before)[0]
    return data[:at] + blob + data[at:], at


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, padded to even length."""
    value += (b"\x00" if vr == b"UI" else b" ") * (len(value) % 2)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def marker(tag: int, length: int = 0) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)


def sequence(tag: int, body: bytes) -> bytes:
    """An undefined-length SQ holding one undefined-length item, both delimited."""
    head = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
    return head + marker(ITEM, 0xFFFFFFFF) + body + marker(ITEM_END) + marker(SEQ_END)


def nested(depth: int) -> bytes:
    """Content Sequence inside Content Sequence, `depth` levels; a text innermost."""
    body = element(0x0040A040, b"CS", b"TEXT") + element(0x0040A160, b"UT", b"deep")
    for _ in range(depth):
        body = sequence(0x0040A730, body)
    return body


# --- the corpus ------------------------------------------------------------------

class Corpus:
    def __init__(self, dest: Path) -> None:
        self.dest, self.cases = dest, []

    def path(self, relpath: str) -> Path:
        (self.dest / relpath).parent.mkdir(parents=True, exist_ok=True)
        return self.dest / relpath

    def add(self, name: str, relpath: str, data: bytes | None, expect: str,
            reason: str | None = None, note: str = "") -> Path:
        """Record a case and write `data`; with None the caller makes the entry."""
        assert expect in EXPECTS and (reason in REASONS) == (expect == "rejected"), name
        assert name not in {case.name for case in self.cases}, name
        if data is not None:
            self.path(relpath).write_bytes(data)
        self.cases.append(Case(name, relpath, expect, reason, note))
        return self.path(relpath)

    def reject(self, reason: str, rows) -> None:
        for name, relpath, data, note in rows:
            self.add(name, relpath, data, "rejected", reason, note)


def png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def zipped(name: str, data: bytes) -> bytes:
    fp = io.BytesIO()
    with zipfile.ZipFile(fp, "w") as archive:
        archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return fp.getvalue()


def add_valid(c: Corpus) -> bytes:
    """Files that must import: every encoding, awkward names, a disc with DICOMDIR."""
    multi, odd = ct("multi-frame", frames=3), ct("odd length", rows=3, cols=3, bits=8)
    multi.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    odd.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    multi.Modality = odd.Modality = "OT"
    valid = part10(ct("valid"))
    rows = [("valid_ct", "valid_ct.dcm", valid, "the reference file"),
            ("implicit_with_meta", "implicit.dcm", part10(ct("implicit"), IMPLICIT),
             "Part 10, Implicit VR Little Endian"),
            ("bare_implicit", "bare_implicit.dcm", encode_body(ct("bare"), IMPLICIT),
             "no preamble, no DICM, no file meta: an Implicit VR LE dataset"),
            ("big_endian", "big_endian.dcm", part10(ct("big endian"), ExplicitVRBigEndian),
             "Explicit VR Big Endian (retired syntax), pixels byte-swapped"),
            ("deflated", "deflated.dcm", part10(ct("deflated"), DeflatedExplicitVRLittleEndian),
             "Deflated Explicit VR Little Endian"),
            ("rle_lossless", "rle.dcm", rle_file("rle"), "encapsulated RLE Lossless"),
            ("multi_frame", "multi_frame.dcm", part10(multi), "3 complete frames"),
            ("odd_pixel_length", "odd_pixels.dcm", part10(odd), "3x3 8-bit: 9 bytes padded to 10"),
            ("nested_10_deep", "nested_10.dcm",
             splice(part10(ct("nested 10")), PIXEL_DATA, nested(10))[0],
             "Content Sequence nested 10 deep")]
    names = (("name_unicode", "ünïcødé_画像.dcm"), ("name_spaces", "name with  spaces .dcm"),
             ("name_newline", "new\nline.dcm"), ("name_leading_dash", "-rf.dcm"),
             ("name_255_bytes", "n" * 251 + ".dcm"), ("name_latin1_bytes", "caf\udce9.dcm"),
             ("no_extension", "IMG00001"),
             ("deep_path", "/".join(f"d{i:02d}" for i in range(12)) + "/IMG00001"))
    rows += [(name, relpath, part10(ct(name)), f"valid; awkward name ({len(os.fsencode(relpath))}"
              " bytes)") for name, relpath in names]
    for name, relpath, data, note in rows:
        c.add(name, relpath, data, "imported", note=note)
    fs = FileSet()
    fs.UID, fs.ID = uid("file-set"), "HOSTILE"
    ds = ct("on a disc")
    ds.file_meta = file_meta(ds, EXPLICIT)
    fs.add(ds)
    fs.write(c.path("cd/DICOMDIR").parent)
    c.add("dicomdir", "cd/DICOMDIR", None, "dicomdir", note="made by pydicom's FileSet")
    c.add("cd_image", "cd/PT000000/ST000000/SE000000/IM000000", None, "imported",
          note="the one image cd/DICOMDIR lists")
    return valid


def add_not_dicom(c: Corpus, valid: bytes, sparse: bool) -> None:
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    c.reject("not-dicom", [
        ("empty", "empty.dcm", b"", "0 bytes"),
        ("one_byte", "one_byte.dcm", b"\x08", "1 byte, 0x08 (as a bare dataset would start)"),
        ("bytes_131", "bytes_131.dcm", PREAMBLE[:131], "preamble + 'DIC': 131 bytes"),
        ("random_bytes", "random.bin", random.Random(20240101).randbytes(4096),
         "4096 seeded random bytes"),
        ("png", "image.png", png(), "a 1x1 grey PNG"),
        ("pdf", "report.pdf", pdf, "a minimal PDF"),
        ("zip", "images.zip", zipped("valid_ct.dcm", valid), "a ZIP holding valid_ct.dcm"),
        ("text", "notes.txt", b"Patient CD - please import.\n", "plain text"),
        ("html_named_dcm", "report.dcm", b"<html><body>404</body></html>\n", "HTML named .dcm"),
        ("wrong_magic", "wrong_magic.dcm", PREAMBLE[:128] + b"DICN" + part10(ct("dicn"))[132:],
         "preamble + 'DICN' + a valid meta and dataset")])
    if sparse:
        c.reject("not-dicom", [("sparse_2gib", "sparse_2gib.dcm", b"", "2 GiB of zeros, sparse")])
        os.truncate(c.path("sparse_2gib.dcm"), 2 << 30)


def cut_in_sequence(label: str, seq: bytes, keep: int) -> bytes:
    """A valid file with `seq` inserted before Patient Name, ending `keep` bytes into it."""
    data, at = splice(part10(ct(label)), PATIENT_NAME, seq)
    return data[:at + keep]


def add_truncated(c: Corpus) -> None:
    short, frames, bare = ct("short pixels"), ct("short frames", frames=3), ct("no pixels")
    short.PixelData, frames.PixelData = short.PixelData[:256], frames.PixelData[:512]
    del bare.PixelData
    refs = (element(0x00081150, b"UI", CT_STORAGE.encode())
            + element(0x00081155, b"UI", uid("referenced").encode()))
    seq = sequence(0x00081140, refs)  # Referenced Image Sequence: SQ 12 + item 8 bytes, refs
    assert seq[20:24] == b"\x08\x00\x50\x11" and seq.endswith(marker(SEQ_END))
    rle = rle_file("cut fragment")
    _, fragments, length = locate(rle, PIXEL_DATA)  # 12-byte offset table item, then ours
    assert length == 0xFFFFFFFF and rle[fragments + 12:fragments + 20] == marker(ITEM, 608)
    c.reject("truncated", [
        ("preamble_only", "preamble_only.dcm", PREAMBLE, "preamble + DICM, nothing after"),
        ("cut_in_element_header", "cut_header.dcm",
         cut("cut header", PATIENT_NAME, lambda header, value, n: header + 5),
         "ends 5 bytes into Patient Name's 8-byte header"),
        ("cut_in_value", "cut_value.dcm",
         cut("cut value", STUDY_DESCRIPTION, lambda header, value, n: value + n // 2),
         "ends half-way through Study Description's value"),
        ("cut_in_pixel_data", "cut_pixels.dcm",
         cut("cut pixels", PIXEL_DATA, lambda header, value, n: value + 200),
         "Pixel Data declares 512 bytes, 200 follow"),
        ("pixel_data_short", "short_pixels.dcm", part10(short),
         "whole element, but 256 of 16*16*2 = 512 bytes"),
        ("frames_short", "short_frames.dcm", part10(frames), "Number of Frames 3, one frame"),
        ("cut_in_sequence_item", "cut_sequence_item.dcm", cut_in_sequence("sq1", seq, 30),
         "ends inside the first element of an undefined-length item"),
        ("item_without_delimiter", "item_no_delimiter.dcm",
         cut_in_sequence("sq2", seq, 20 + len(refs)),
         "ends after the item's last element: no item or sequence delimiter"),
        ("sequence_without_delimiter", "sequence_no_delimiter.dcm",
         cut_in_sequence("sq3", seq, len(seq) - 8),
         "ends after the item delimiter: no sequence delimiter"),
        ("cut_in_fragment", "cut_fragment.dcm", rle[:fragments + 20 + 100],
         "RLE: ends 100 bytes into the 608-byte fragment"),
        ("encapsulated_without_delimiter", "encaps_no_delimiter.dcm", rle_file("no end")[:-8],
         "RLE: every fragment, no sequence delimiter"),
        ("absurd_length_ob", "absurd_ob.dcm",
         patched(part10(ct("absurd ob")), 0x00020001, 8, HUGE),
         "File Meta Information Version (OB) declares 0xFFFFFFFE bytes"),
        ("absurd_length_pixel_data", "absurd_pixels.dcm",
         patched(part10(ct("absurd pixels")), PIXEL_DATA, 8, HUGE),
         "Pixel Data (OW) declares 0xFFFFFFFE bytes"),
        ("absurd_length_string", "absurd_string.dcm",
         patched(part10(ct("absurd string"), IMPLICIT), STUDY_DESCRIPTION, 4, HUGE, implicit=True),
         "Implicit VR: Study Description (LO) declares 0xFFFFFFFE bytes")])
    # whole, but without what its class needs: maybe a copy that stopped at an element
    # boundary, maybe never there; not "truncated" (nothing ends inside an element)
    c.reject("missing-attribute", [("pixel_data_absent", "no_pixels.dcm", part10(bare),
                                    "Rows and Columns but no Pixel Data: stopped at an element boundary")])


def add_malformed(c: Corpus) -> None:
    explicit_says_implicit, implicit_says_explicit = ct("meta explicit"), ct("meta implicit")
    c.reject("malformed", [
        ("invalid_vr_letters", "invalid_vr_letters.dcm",
         patched(part10(ct("vr letters")), STUDY_DESCRIPTION, 4, b"QQ"),
         "Study Description's VR is 'QQ'"),
        ("invalid_vr_zero", "invalid_vr_zero.dcm",
         patched(part10(ct("vr zero")), STUDY_DESCRIPTION, 4, b"\x00\x00"),
         "Study Description's VR is two zero bytes"),
        ("item_delimiter_at_top_level", "stray_delimiter.dcm",
         splice(part10(ct("stray delimiter")), PATIENT_NAME, marker(ITEM_END))[0],
         "an Item Delimitation Item between two top-level elements"),
        ("nested_300_deep", "nested_300.dcm",
         splice(part10(ct("nested 300")), PIXEL_DATA, nested(300))[0],
         "Content Sequence nested 300 deep, every level delimited"),
        ("ts_says_explicit_is_implicit", "ts_explicit_is_implicit.dcm",
         encode_meta(explicit_says_implicit, EXPLICIT) + encode_body(explicit_says_implicit, IMPLICIT),
         "meta: Explicit VR LE; dataset: Implicit VR LE"),
        ("ts_says_implicit_is_explicit", "ts_implicit_is_explicit.dcm",
         encode_meta(implicit_says_explicit, IMPLICIT) + encode_body(implicit_says_explicit, EXPLICIT),
         "meta: Implicit VR LE; dataset: Explicit VR LE")])


def add_identity_problems(c: Corpus, valid: bytes) -> None:
    c.reject("truncated", [("meta_only", "meta_only.dcm", encode_meta(ct("meta only"), EXPLICIT),
                            "preamble + DICM + file meta, no dataset: a copy that stopped there")])
    missing = []
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds = ct(f"missing {keyword}")
        del ds[keyword]
        missing.append((f"missing_{keyword}", f"missing_{keyword}.dcm", part10(ds),
                        f"{keyword} absent; the file meta has a value"))
    ds = ct("empty SOPInstanceUID")
    put(ds, "SOPInstanceUID", "")
    missing.append(("empty_SOPInstanceUID", "empty_SOPInstanceUID.dcm", part10(ds),
                    "SOP Instance UID present, zero length; the file meta has a value"))
    c.reject("missing-attribute", missing)
    invalid = []
    for name, keyword, value in (("uid_too_long", "SOPInstanceUID", "1.2.840." + "1" * 57),
                                 ("uid_letters", "StudyInstanceUID", "1.2.840.abc.1"),
                                 ("uid_empty_component", "SeriesInstanceUID", "1.2..3"),
                                 ("uid_leading_zero", "SOPInstanceUID", "1.2.840.02"),
                                 ("uid_trailing_dot", "SOPClassUID", CT_STORAGE + ".")):
        ds = ct(name)
        put(ds, keyword, value)
        invalid.append((name, f"{name}.dcm", part10(ds),
                        f"{keyword} {value[:20]!r}.. ({len(value)} chars); file meta agrees"))
    c.reject("invalid-uid", invalid)
    c.reject("meta-mismatch", [("meta_sop_instance_mismatch", "meta_mismatch.dcm",
                                part10(ct("mismatch"), MediaStorageSOPInstanceUID=uid("other")),
                                "Media Storage SOP Instance UID is another UID")])
    c.add("duplicate", "zz_duplicate_of_valid_ct.dcm", valid, "duplicate",
          note="same bytes as valid_ct.dcm; import that first")
    changed = ct("valid")
    changed.PatientName = "CORRECTED^NAME"
    c.reject("conflict", [("conflict", "zz_conflict_with_valid_ct.dcm", part10(changed),
                           "valid_ct.dcm's SOP Instance UID, other Patient Name; import that first")])


def add_filesystem_oddities(c: Corpus) -> None:
    c.add("partial_download", "x.part", part10(ct("part")), "ignored", note="valid DICOM named .part")
    c.add("hidden", ".hidden", part10(ct("hidden")), "ignored", note="valid DICOM, dot name")
    outside = get_testdata_file("CT_small.dcm")
    links = (("symlink_outside_file", "link_outside.dcm", outside, "pydicom's CT_small.dcm"),
             ("symlink_outside_dir", "link_outside_dir", str(Path(outside).parent),
              "pydicom's folder of test files"),
             ("symlink_inside_file", "link_inside.dcm", "valid_ct.dcm", "valid_ct.dcm"),
             ("symlink_inside_dir", "link_inside_dir", "d00", "d00/, the deep_path tree"),
             ("symlink_dangling", "link_dangling.dcm", "missing.dcm", "nothing"),
             ("symlink_loop_a", "loop_a", "loop_b", "loop_b, which points back"),
             ("symlink_loop_b", "loop_b", "loop_a", "loop_a, which points back"),
             ("symlink_self", "loop_self", "loop_self", "itself"))
    c.reject("symlink", [(name, relpath, None, f"points to {what}")
                         for name, relpath, _, what in links])
    for _, relpath, target, _ in links:
        c.path(relpath).symlink_to(target)
    os.mkfifo(c.path("pipe.dcm"))
    c.reject("special-file", [("fifo", "pipe.dcm", None, "a FIFO; opening it would block")])
    if make_socket(c.path("socket.dcm")):
        c.reject("special-file", [("socket", "socket.dcm", None, "a Unix socket, no listener")])
    if os.geteuid() == 0:
        try:
            os.mknod(c.path("null.dcm"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
            c.reject("special-file", [("device", "null.dcm", None, "char device 1,3; root only")])
        except OSError:
            pass  # a container without CAP_MKNOD
    else:
        c.reject("unreadable", [("unreadable", "unreadable.dcm", part10(ct("unreadable")),
                                 "valid DICOM, mode 000; only made when not root")])
        c.path("unreadable.dcm").chmod(0)


def make_socket(path: Path) -> bool:
    """Leave a Unix socket at `path`; False if the path cannot be bound."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.bind(str(path))
        except OSError:  # longer than sun_path allows: bind through the folder's fd
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                sock.bind(f"/proc/self/fd/{fd}/{path.name}")
            except OSError:
                return False
            finally:
                os.close(fd)
    return True


def build(dest: Path, *, sparse: bool = True, mtime: int | None = MTIME) -> list[Case]:
    """Create the corpus in `dest` (absent or empty) and return its cases."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; give a new or empty folder")
    c = Corpus(dest)
    valid = add_valid(c)
    add_not_dicom(c, valid, sparse)
    add_truncated(c)
    add_malformed(c)
    add_identity_problems(c, valid)
    add_filesystem_oddities(c)
    if mtime is not None:
        for root, dirs, files in os.walk(dest, topdown=False):
            for name in [*files, *dirs, "."]:
                os.utime(os.path.join(root, name), (mtime, mtime), follow_symlinks=False)
    return c.cases


def check(dest: Path, cases: list[Case]) -> None:
    """Each entry is the kind of file its case says; importable ones really are."""
    from pydicom import dcmread

    for case in cases:
        path = dest / case.relpath
        kind = stat.S_IFMT(os.lstat(path).st_mode)
        wanted = {"symlink": {stat.S_IFLNK},
                  "special-file": {stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR}}
        assert kind in wanted.get(case.reason, {stat.S_IFREG}), case.name
        if case.expect in ("imported", "duplicate"):
            ds = dcmread(path, force=case.name == "bare_implicit")
            assert ds.SOPInstanceUID and ds.StudyInstanceUID and ds.SeriesInstanceUID
            if case.name != "rle_lossless":
                size = ds.Rows * ds.Columns * ds.BitsAllocated // 8 * ds.get("NumberOfFrames", 1)
                assert len(ds.PixelData) == size + size % 2, case.name


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/hostile_corpus.py DEST")
    target = Path(sys.argv[1])
    built = build(target)
    check(target, built)
    for case in built:
        outcome = f"{case.expect} {case.reason or ''}"
        print(f"{case.name:31} {outcome:28} {ascii(case.relpath)[:40]:41} {case.note}")
    print(f"{len(built)} cases in {target}")
