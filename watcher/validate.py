"""Prove that a file is one complete DICOM instance, and read what we index it by.

pydicom reads a truncated file without complaint, so completeness is proved
here, in one pass over the element headers: every element, item and fragment
must fit in the file, every undefined-length sequence, item and encapsulated
Pixel Data must be closed by its delimiter, and native Pixel Data must hold
the bytes its image attributes imply. Values are read only for the handful of
top-level attributes we index, so a declared length is never allocated: a
hostile length can only make an element "not fit".

Outcomes: a ``DicomInfo``; ``NotReady`` (incomplete: maybe still being
written); or ``Rejected`` (never importable as it is).
"""

import functools
import re
import struct
import zlib
from dataclasses import dataclass, field

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import UID

from .errors import NotReady, Rejected

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"

UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 64
MAX_ELEMENTS = 2_000_000
MAX_VALUE = 1024  # longest value we read for an indexed attribute
MAX_INFLATED = 256 << 20
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
OTHER_PIXEL_DATA = {0x7FE00008, 0x7FE00009}
DIRECTORY_RECORDS = 0x00041220
CONTENT_SEQUENCE = 0x0040A730
ENCAPSULATED_DOCUMENT = 0x00420011
CLOSING = {PIXEL_DATA, CONTENT_SEQUENCE, ENCAPSULATED_DOCUMENT} | OTHER_PIXEL_DATA

INDEXED = {  # top-level attributes we read: tag -> keyword
    0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
    0x00020010: "TransferSyntaxUID", 0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate", 0x00080030: "StudyTime", 0x00080050: "AccessionNumber",
    0x00080060: "Modality", 0x00080080: "InstitutionName", 0x00080090: "ReferringPhysicianName",
    0x00081010: "StationName", 0x00081030: "StudyDescription", 0x0008103E: "SeriesDescription",
    0x00100010: "PatientName", 0x00100020: "PatientID", 0x00100021: "IssuerOfPatientID",
    0x00100030: "PatientBirthDate", 0x00100040: "PatientSex",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID", 0x00200010: "StudyID",
    0x00200011: "SeriesNumber", 0x00200013: "InstanceNumber",
    0x00280002: "SamplesPerPixel", 0x00280004: "PhotometricInterpretation",
    0x00280008: "NumberOfFrames", 0x00280010: "Rows", 0x00280011: "Columns",
    0x00280100: "BitsAllocated",
}
BINARY_US = {"SamplesPerPixel", "Rows", "Columns", "BitsAllocated"}
TEXT = {"PatientName", "PatientID", "IssuerOfPatientID", "StudyDescription",
        "SeriesDescription", "AccessionNumber", "StudyID", "InstitutionName",
        "ReferringPhysicianName", "StationName"}
REQUIRED_UIDS = {"SOPClassUID": 0x00080016, "SOPInstanceUID": 0x00080018,
                 "StudyInstanceUID": 0x0020000D, "SeriesInstanceUID": 0x0020000E}
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


@dataclass(frozen=True)
class DicomInfo:
    """What one complete file is: its identity and the attributes a person browses by."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    is_dicomdir: bool = False
    attributes: dict = field(default_factory=dict, compare=False)


def validate(source) -> DicomInfo:
    """``source`` offers ``size`` and ``read_at(pos, n)`` (see ``watcher.source``)."""
    raw, syntax, explicit, little, pos = _read_meta(source)
    if syntax == DEFLATED:
        source, pos = _Inflated(source, pos), 0
    walk = _Walk(source, explicit, little)
    walk.run(pos)
    raw.update(walk.found)
    return _describe(raw, walk, syntax, explicit)


def is_valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and UID_PATTERN.fullmatch(uid) is not None


def _read_meta(source):
    """Find where the dataset starts and how it is encoded.

    Part-10 files start with a 128-byte preamble and 'DICM', then the file
    meta group (explicit VR little endian). Old discs write bare datasets:
    those are recognised by a first element in group 0008 that parses
    cleanly, never by guessing (no ``force``).
    """
    head = source.read_at(0, 132)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if has_preamble or (head[:2] == b"\x02\x00" and _is_vr(head[4:6])):
        meta = _Walk(source, explicit=True, little=True, only_group=0x0002)
        end = meta.run(132 if has_preamble else 0)
        if end >= source.size:
            raise NotReady("the file meta is there but the dataset is not (yet)")
        syntax = meta.found.get("TransferSyntaxUID", b"").decode("ascii", "replace").strip("\0 ")
        if not syntax:
            raise Rejected("malformed", "the file meta has no Transfer Syntax UID (0002,0010)")
        explicit, little = syntax != IMPLICIT_LE, syntax != EXPLICIT_BE
        if syntax != DEFLATED:
            _check_encoding(source, end, explicit, little, syntax)
        return dict(meta.found), syntax, explicit, little, end
    encoding = _sniff_bare_dataset(head)
    if encoding is None:
        if len(head) < 132 and (not head or not head.strip(b"\0")):
            raise NotReady(f"only {len(head)} bytes, all zero: too short to tell what it is",
                           reason="not-dicom")
        if not head.strip(b"\0"):
            raise NotReady("the first 132 bytes are zeros: the file may still be being written",
                           reason="not-dicom")
        if len(head) < 132 and _is_prefix_of_preamble(head):
            raise NotReady(f"only {len(head)} bytes: too short to tell what it is",
                           reason="not-dicom")
        raise Rejected("not-dicom", "not a DICOM file: no 'DICM' marker after the 128-byte "
                       "preamble, and not a bare DICOM dataset")
    explicit, little = encoding
    syntax = IMPLICIT_LE if not explicit else ("1.2.840.10008.1.2.1" if little else EXPLICIT_BE)
    return {}, syntax, explicit, little, 0


def _is_prefix_of_preamble(head: bytes) -> bool:
    return len(head) <= 128 and head.count(0) > len(head) // 2


def _sniff_bare_dataset(head: bytes):
    """(explicit, little) when ``head`` starts like a dataset in group 0008, else None."""
    if len(head) < 8:
        return None
    for little in (True, False):
        group, elem = struct.unpack("<HH" if little else ">HH", head[:4])
        if group != 0x0008 or elem > 0x0020:
            continue
        if _is_vr(head[4:6]):
            return True, little
        if little and struct.unpack("<I", head[4:8])[0] < 0x400:
            return False, True
    return None


VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
       b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
       b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


def _is_vr(two: bytes) -> bool:
    return two in VRS


def _check_encoding(source, pos, explicit, little, syntax):
    """The meta says how the dataset is encoded; the first element must agree."""
    head = source.read_at(pos, 8)
    if len(head) < 8:
        return  # the walk will say the file is incomplete
    looks_explicit = _is_vr(head[4:6])
    if looks_explicit != explicit and head.strip(b"\0"):
        said = "explicit" if explicit else "implicit"
        found = "implicit" if explicit else "explicit"
        raise Rejected("malformed", f"the file meta's Transfer Syntax {syntax} says {said} VR, "
                       f"but the dataset is encoded with {found} VR")


class _Walk:
    """One pass over element headers, proving every element fits and every container closes."""

    def __init__(self, source, explicit, little, only_group=None):
        self.source, self.size = source, source.size
        self.explicit, self.little = explicit, little
        self.only_group = only_group
        self.found: dict[str, bytes] = {}
        self.pixel_length = None  # declared length of native Pixel Data
        self.encapsulated = False
        self.other_pixel_data = False
        self.has_directory = False
        self.last_tag = 0  # elements come in ascending tag order: what is missing below is missing
        self.seen = set()  # which of CLOSING stand at the top level

    def run(self, pos: int) -> int:
        stack = []  # open containers: (kind, explicit, little, start)
        explicit, little = self.explicit, self.little
        for _ in range(MAX_ELEMENTS):
            if pos >= self.size:
                if stack:
                    kind, _, _, start = stack[-1]
                    raise NotReady(f"the file ends inside the {_NAMES[kind]} that starts at "
                                   f"byte {start}: its delimiter is missing")
                return pos
            head = self.source.read_at(pos, 12)
            if len(head) < 8:
                raise NotReady(f"the file ends inside the element header at byte {pos}")
            if not any(head[:8]):
                raise NotReady(f"zeros where an element should start (byte {pos}): "
                               "the file may still be being written")
            e = "<" if little else ">"
            group, elem = struct.unpack(e + "HH", head[:4])
            tag = group << 16 | elem
            if self.only_group is not None and group != self.only_group:
                return pos
            kind = stack[-1][0] if stack else None
            if group == 0xFFFE:
                length = struct.unpack(e + "I", head[4:8])[0]
                pos = self._delimiter(tag, length, kind, stack, pos)
                if stack:
                    _, explicit, little, _ = stack[-1]
                else:
                    explicit, little = self.explicit, self.little
                continue
            if kind in ("sequence", "fragments"):
                raise Rejected("malformed", f"element ({group:04X},{elem:04X}) at byte {pos} "
                               f"stands inside a {_NAMES[kind]} where only items may")
            if explicit:
                vr = head[4:6]
                if not _is_vr(vr):
                    raise Rejected("malformed", f"element ({group:04X},{elem:04X}) at byte {pos} "
                                   f"has an invalid VR {vr!r}")
                if vr in LONG_VRS:
                    if len(head) < 12:
                        raise NotReady(f"the file ends inside the element header at byte {pos}")
                    length, value_pos = struct.unpack(e + "I", head[8:12])[0], pos + 12
                else:
                    length, value_pos = struct.unpack(e + "H", head[6:8])[0], pos + 8
            else:
                vr, length, value_pos = None, struct.unpack(e + "I", head[4:8])[0], pos + 8
            if length == UNDEFINED:
                if len(stack) >= MAX_DEPTH:
                    raise Rejected("malformed", f"sequences nested deeper than {MAX_DEPTH} levels")
                if vr in (b"OB", b"OW"):
                    stack.append(("fragments", explicit, little, pos))
                    self.encapsulated |= tag == PIXEL_DATA and len(stack) == 1
                elif vr is None or vr in (b"SQ", b"UN"):
                    if vr == b"UN":  # contents of an undefined-length UN are implicit VR LE
                        explicit, little = False, True
                    stack.append(("sequence", explicit, little, pos))
                    self.has_directory |= tag == DIRECTORY_RECORDS and len(stack) == 1
                else:
                    raise Rejected("malformed", f"element ({group:04X},{elem:04X}) at byte {pos} "
                                   f"has undefined length but VR {vr.decode()}")
                if len(stack) == 1:
                    self.last_tag = tag
                    if tag in CLOSING:
                        self.seen.add(tag)
                pos = value_pos
                continue
            if value_pos + length > self.size:
                raise NotReady(f"element ({group:04X},{elem:04X}) at byte {pos} declares "
                               f"{length} bytes but the file ends {self.size - value_pos} bytes "
                               "after its header")
            if not stack:
                self._note(tag, vr, length, value_pos)
            pos = value_pos + length
        raise Rejected("malformed", f"more than {MAX_ELEMENTS} elements: not a plausible dataset")

    def _delimiter(self, tag, length, kind, stack, pos):
        if tag == ITEM and kind == "sequence":
            if length == UNDEFINED:
                if len(stack) >= MAX_DEPTH:
                    raise Rejected("malformed", f"sequences nested deeper than {MAX_DEPTH} levels")
                _, explicit, little, _ = stack[-1]
                stack.append(("item", explicit, little, pos))
                return pos + 8
        elif tag == ITEM and kind == "fragments":
            if length == UNDEFINED:
                raise Rejected("malformed", f"encapsulated fragment at byte {pos} has undefined length")
        elif tag == ITEM_END and kind == "item" or tag == SEQUENCE_END and kind in ("sequence", "fragments"):
            stack.pop()
            return pos + 8
        else:
            raise Rejected("malformed", f"delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos} "
                           f"where it may not stand")
        if pos + 8 + length > self.size:
            raise NotReady(f"the item at byte {pos} declares {length} bytes but the file ends "
                           f"{self.size - pos - 8} bytes after its header")
        return pos + 8 + length

    def _note(self, tag, vr, length, value_pos):
        self.last_tag = tag
        if tag in CLOSING:
            self.seen.add(tag)
        if tag == PIXEL_DATA:
            self.pixel_length = length
        elif tag in OTHER_PIXEL_DATA:
            self.other_pixel_data = True
        elif tag == DIRECTORY_RECORDS:
            self.has_directory = True
        keyword = INDEXED.get(tag)
        if keyword and length <= MAX_VALUE:
            value = self.source.read_at(value_pos, length)
            if keyword in BINARY_US and (vr in (None, b"US", b"SS")) and length == 2:
                value = str(struct.unpack("<H" if self.little else ">H", value)[0]).encode()
            self.found[keyword] = value
        elif keyword:
            self.found[keyword] = b"\0" * 65  # too long to be any valid value


_NAMES = {"sequence": "sequence", "item": "sequence item", "fragments": "encapsulated Pixel Data"}


class _Inflated:
    """A deflated dataset, inflated in memory (bounded), for the walk."""

    def __init__(self, source, pos):
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        parts, total = [], 0
        while pos < source.size:
            chunk = source.read_at(pos, 1 << 20)
            pos += len(chunk)
            try:
                part = inflater.decompress(chunk, MAX_INFLATED - total)
            except zlib.error as exc:
                raise Rejected("malformed", f"the deflated dataset is corrupt: {exc}") from None
            parts.append(part)
            total += len(part)
            if inflater.unconsumed_tail:
                raise Rejected("malformed", f"the deflated dataset inflates beyond {MAX_INFLATED >> 20} MiB")
            if inflater.eof:
                break
        if not inflater.eof:
            raise NotReady("the deflated dataset is not finished: the file ends inside it")
        self.data = b"".join(parts)
        self.size = len(self.data)

    def read_at(self, pos, n):
        return self.data[pos:pos + n]


def _is_disc_index(raw: dict, walk: "_Walk") -> bool:
    """Only a real DICOMDIR is a disc index: Media Storage Directory Storage with its
    directory record sequence, and no image data. Anything else is judged as an instance."""
    has_pixels = walk.pixel_length is not None or walk.encapsulated or walk.other_pixel_data
    return (_text(raw, "MediaStorageSOPClassUID") == DICOMDIR_CLASS and walk.has_directory
            and not has_pixels)


def _text(raw: dict, keyword: str) -> str:
    return raw.get(keyword, b"").decode("ascii", "replace").strip("\0 ")


def _describe(raw: dict, walk: _Walk, syntax: str, explicit: bool) -> DicomInfo:
    uids = {k: _text(raw, k) for k in REQUIRED_UIDS}
    if _is_disc_index(raw, walk):
        return DicomInfo(DICOMDIR_CLASS, _text(raw, "MediaStorageSOPInstanceUID"), "", "",
                         syntax, is_dicomdir=True)
    missing = [k for k, v in uids.items() if not v]
    if missing and all(REQUIRED_UIDS[k] > walk.last_tag for k in missing):
        raise NotReady(f"it ends before {' and '.join(missing)}: maybe still being written",
                       reason="missing-attribute")
    if missing:
        raise Rejected("missing-attribute", f"required attribute {' and '.join(missing)} is missing "
                       "or empty; the file cannot be filed without it")
    for keyword, uid in uids.items():
        if not is_valid_uid(uid):
            shown = uid if len(uid) <= 80 else uid[:80] + "..."
            raise Rejected("invalid-uid", f"{keyword} {shown!r} is not a valid UID "
                           "(digits and dots, at most 64 characters, no empty or zero-led component)")
    meta_uid = _text(raw, "MediaStorageSOPInstanceUID")
    if meta_uid and meta_uid != uids["SOPInstanceUID"]:
        raise Rejected("meta-mismatch", f"the file meta names SOP Instance UID {meta_uid} but the "
                       f"dataset {uids['SOPInstanceUID']}; the file was edited inconsistently")
    _check_closing_element(uids["SOPClassUID"], walk)
    _check_pixels(raw, walk)
    return DicomInfo(uids["SOPClassUID"], uids["SOPInstanceUID"], uids["StudyInstanceUID"],
                     uids["SeriesInstanceUID"], syntax, attributes=_attributes(raw))


@functools.lru_cache(maxsize=256)
def _closing_elements(sop_class_uid: str):
    """The element an instance of this class must end with (near enough), and its name."""
    name = UID(sop_class_uid).name
    if name.endswith("Image Storage") or name in ("Segmentation Storage", "Parametric Map Storage"):
        return {PIXEL_DATA} | OTHER_PIXEL_DATA, "Pixel Data"
    if name.startswith("Encapsulated") and name.endswith("Storage"):
        return {ENCAPSULATED_DOCUMENT}, "Encapsulated Document"
    if name.endswith("SR Storage"):
        return {CONTENT_SEQUENCE}, "Content Sequence"
    return None, None


def _check_closing_element(sop_class_uid: str, walk: _Walk) -> None:
    """A copy that stopped at an element boundary looks complete: catch it by what is missing.

    An image without Pixel Data (a PDF without its document, an SR without
    content) is "not ready" while the file may still grow, and rejected as
    missing the attribute once it cannot.
    """
    tags, what = _closing_elements(sop_class_uid)
    if tags is None or walk.seen & tags:
        return
    if min(tags) > walk.last_tag:  # whole, but without what its class requires: maybe not yet
        missing = what
        if what == "Pixel Data":
            absent = [k for k in ("Rows", "Columns") if k not in walk.found]
            missing = ", ".join(absent + [what]) if absent else what
        raise NotReady(f"a {UID(sop_class_uid).name} without {missing}: the copy may still be "
                       "running, or stopped early, or the file never had it",
                       reason="missing-attribute")
    raise Rejected("missing-attribute", f"a {UID(sop_class_uid).name} without {what}")


def _check_pixels(raw: dict, walk: _Walk) -> None:
    rows, columns = _number(raw, "Rows"), _number(raw, "Columns")
    if walk.pixel_length is None and not walk.encapsulated:
        if rows and columns and not walk.other_pixel_data:
            raise NotReady("it declares Rows and Columns but has no Pixel Data (yet)",
                           reason="missing-attribute")
        return
    if walk.encapsulated or not (rows and columns):
        return
    frames = _number(raw, "NumberOfFrames") or 1
    samples = _number(raw, "SamplesPerPixel") or 1
    bits = _number(raw, "BitsAllocated") or 0
    if not bits:
        return
    if _text(raw, "PhotometricInterpretation") == "YBR_FULL_422":
        expected = rows * columns * frames * 2 * bits // 8
    else:
        expected = (rows * columns * frames * samples * bits + 7) // 8
    expected += expected % 2
    if walk.pixel_length < expected:
        raise Rejected("truncated", f"Pixel Data holds {walk.pixel_length} bytes but Rows {rows} x "
                       f"Columns {columns} x Frames {frames} x Samples {samples} x {bits} bits "
                       f"imply {expected}")


def _number(raw: dict, keyword: str) -> int | None:
    try:
        return int(_text(raw, keyword).split("\\")[0])
    except ValueError:
        return None


def _attributes(raw: dict) -> dict:
    """Indexed attributes as text, decoded with the file's Specific Character Set."""
    try:
        terms = [t.strip() for t in _text(raw, "SpecificCharacterSet").split("\\")]
        encodings = convert_encodings(terms if any(terms) else None)
    except Exception:
        encodings = ["iso8859"]
    out = {}
    for keyword, value in raw.items():
        if keyword in TEXT:
            try:
                text = decode_bytes(value, encodings, {0x5C, 0x3D, 0x5E})
            except Exception:
                text = value.decode("latin-1")
        else:
            text = value.decode("ascii", "replace")
        out[keyword] = text.strip("\0 ")
    return out
