"""validate() proves completeness and identity on real files, or says why not."""

from pathlib import Path
import struct
import zlib

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from dicomfiles import bundled, ct, write, write_bare
from watcher.errors import NotReady, Rejected
from watcher.source import Source
from watcher.validate import DICOMDIR_CLASS, is_valid_uid, validate


def check(path):
    path = Path(path)
    with Source(path.parent, path.name, lease=False) as source:
        return validate(source)


def rejected(path) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(path)
    return info.value


def cut(src, dest, at: int):
    dest.write_bytes(src.read_bytes()[:at])
    return dest


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm",
                                  "MR_small_bigendian.dcm", "ExplVR_LitEndNoMeta.dcm", "SC_rgb_rle.dcm",
                                  "image_dfl.dcm", "rtstruct.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_bundled_complete_files_are_accepted(name):
    path = bundled(name)
    if name == "rtplan.dcm":  # pydicom's copy has a meta/dataset UID mismatch
        assert rejected(path).reason == "meta-mismatch"
        return
    info = check(path)
    assert is_valid_uid(info.sop_instance_uid)
    assert info.study_instance_uid and info.series_instance_uid


def test_reads_identity_and_browse_attributes(tmp_path):
    ds = ct(patient_id="P42", StudyDescription="Brain PET")
    info = check(write(tmp_path / "a.dcm", ds))
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.attributes["PatientID"] == "P42"
    assert info.attributes["PatientName"] == "Müller^Anna"
    assert info.attributes["StudyDescription"] == "Brain PET"


@pytest.mark.parametrize("uid_length", [20, 41, 64])
def test_truncation_at_every_byte_is_never_complete(tmp_path, uid_length):
    """Cut a CT file at every byte: each is 'not ready' (or not DICOM before 'DICM')."""
    uid = "1." + "2" * (uid_length - 2)
    src = write(tmp_path / "full.dcm", ct(rows=16, columns=16, sop_uid=uid, study_uid=uid[:-1] + "3",
                                          series_uid=uid[:-1] + "4"))
    size = src.stat().st_size
    for at in range(size):
        part = cut(src, tmp_path / "part.dcm", at)
        try:
            check(part)
        except NotReady:
            continue
        except Rejected as exc:
            assert at < 132 and exc.reason == "not-dicom", (at, exc)
            continue
        pytest.fail(f"a file cut at byte {at} of {size} passed as complete")
    check(src)


def test_cut_bundled_ct_in_pixel_data_is_not_ready(tmp_path):
    src = bundled("ct")
    with pytest.raises(NotReady, match="7FE0,0010"):
        check(cut(src, tmp_path / "half.dcm", src.stat().st_size // 2 + 1000))


def test_cut_inside_encapsulated_fragments_is_not_ready(tmp_path):
    src = bundled("JPEG2000.dcm")
    size = src.stat().st_size
    for at in (size - 2, size - 8, size - 100):
        with pytest.raises(NotReady):
            check(cut(src, tmp_path / "j.dcm", at))


def test_native_pixel_data_shorter_than_its_attributes_is_truncated(tmp_path):
    ds = ct(rows=8, columns=8)
    ds.PixelData = ds.PixelData[:64]
    assert rejected(write(tmp_path / "short.dcm", ds)).reason == "truncated"


@pytest.mark.parametrize("cut_before", ["Rows", "PixelData"])
def test_image_cut_at_an_element_boundary_before_its_pixels_is_not_ready(tmp_path, cut_before):
    ds = ct()
    for keyword in [k for k in ds.dir() if ds.data_element(k).tag >= ds.data_element(cut_before).tag]:
        delattr(ds, keyword)
    with pytest.raises(NotReady, match="Pixel Data"):
        check(write(tmp_path / "cut.dcm", ds))


def test_image_whose_pixel_data_is_missing_mid_file_is_rejected(tmp_path):
    ds = ct()
    del ds.PixelData
    ds.add_new(0x7FE10010, "OB", b"\0\0")  # a private element after where Pixel Data belongs
    assert rejected(write(tmp_path / "nopix.dcm", ds)).reason == "missing-attribute"


def test_rows_and_columns_without_pixel_data_is_not_ready(tmp_path):
    ds = ct()
    del ds.PixelData
    with pytest.raises(NotReady, match="Pixel Data"):
        check(write(tmp_path / "nopix.dcm", ds))


def test_absurd_declared_length_is_not_ready_and_allocates_nothing(tmp_path):
    data = bytearray(write(tmp_path / "a.dcm").read_bytes())
    at = data.find(b"\xe0\x7f\x10\x00OW")
    data[at + 8:at + 12] = struct.pack("<I", 0xFFFFFFFE)
    (tmp_path / "huge.dcm").write_bytes(data)
    with pytest.raises(NotReady, match="declares 4294967294 bytes"):
        check(tmp_path / "huge.dcm")


def test_preamble_less_implicit_dataset_is_accepted(tmp_path):
    info = check(write_bare(tmp_path / "IMG00001"))
    assert info.transfer_syntax_uid == "1.2.840.10008.1.2"


def test_explicit_big_endian_and_deflated_files_are_accepted(tmp_path):
    for syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        ds = ct()
        ds.file_meta.TransferSyntaxUID = syntax
        info = check(write(tmp_path / "x.dcm", ds))
        assert info.transfer_syntax_uid == syntax


def test_cut_deflated_file_is_not_ready(tmp_path):
    src = bundled("image_dfl.dcm")
    with pytest.raises(NotReady, match="deflated"):
        check(cut(src, tmp_path / "d.dcm", src.stat().st_size - 20))


def test_dicomdir_is_recognised_not_an_instance():
    info = check(get_testdata_file("DICOMDIR"))
    assert info.is_dicomdir and info.sop_class_uid == DICOMDIR_CLASS


@pytest.mark.parametrize("content", [b"", b"x", b"%PDF-1.4\n" + bytes(300), b"\x89PNG\r\n\x1a\n" + bytes(300),
                                     b"PK\x03\x04" + bytes(300), b"hello world\n" * 40])
def test_other_formats_are_not_dicom_or_not_ready_when_tiny(tmp_path, content):
    path = tmp_path / "f"
    path.write_bytes(content)
    if len(content) < 132:
        with pytest.raises((NotReady, Rejected)):
            check(path)
    else:
        assert rejected(path).reason == "not-dicom"


@pytest.mark.parametrize("attribute", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                       "SeriesInstanceUID"])
def test_missing_required_uid_is_rejected(tmp_path, attribute):
    ds = ct()
    delattr(ds, attribute)
    if attribute == "SOPInstanceUID":
        del ds.file_meta.MediaStorageSOPInstanceUID
    assert rejected(write(tmp_path / "m.dcm", ds)).reason == "missing-attribute"


@pytest.mark.parametrize("uid", ["1.2.abc", "1..2", "1.02.3", "1." + "2" * 70, ".1.2"])
def test_invalid_uid_is_rejected(tmp_path, uid):
    ds = ct()
    ds.StudyInstanceUID = uid
    assert rejected(write(tmp_path / "u.dcm", ds)).reason == "invalid-uid"


def test_meta_uid_disagreeing_with_dataset_is_rejected(tmp_path):
    ds = ct()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
    assert rejected(write(tmp_path / "mm.dcm", ds)).reason == "meta-mismatch"


def test_wrong_transfer_syntax_in_meta_is_malformed(tmp_path):
    path = write_bare(tmp_path / "bare")  # implicit VR dataset ...
    ds = ct()
    write(tmp_path / "ref.dcm", ds)
    ref = (tmp_path / "ref.dcm").read_bytes()
    meta_end = ref.find(b"\x08\x00\x05\x00")  # ... behind an explicit-VR file meta
    (tmp_path / "wrong.dcm").write_bytes(ref[:meta_end] + path.read_bytes())
    assert rejected(tmp_path / "wrong.dcm").reason == "malformed"


def nested_sequences(depth: int, closed: bool = True) -> bytes:
    """(0040,A730) sequences nested ``depth`` deep, undefined lengths, explicit VR LE."""
    open_ = (b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"  # sequence, undefined length
             b"\xfe\xff\x00\xe0\xff\xff\xff\xff")  # item, undefined length
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return open_ * depth + (close * depth if closed else b"")


def test_sequences_nested_hundreds_deep_are_malformed_without_recursion(tmp_path):
    path = write(tmp_path / "ok.dcm")
    (tmp_path / "deep.dcm").write_bytes(path.read_bytes() + nested_sequences(300))
    assert rejected(tmp_path / "deep.dcm").reason == "malformed"
    (tmp_path / "ten.dcm").write_bytes(path.read_bytes() + nested_sequences(10))
    check(tmp_path / "ten.dcm")


def _undefine_lengths(data: bytes, path):
    """Rewrite a file's nested SQ/items with undefined lengths and delimiters (test helper)."""
    from pydicom import dcmread
    from pydicom.filewriter import dcmwrite
    import io
    ds = dcmread(io.BytesIO(data))

    def mark(d):
        for elem in d:
            if elem.VR == "SQ":
                elem.is_undefined_length = True
                for item in elem.value:
                    item.is_undefined_length_sequence_item = True
                    mark(item)
    mark(ds)
    dcmwrite(path, ds)
    return path


def test_undefined_length_item_without_delimiter_is_not_ready(tmp_path):
    ds = ct()
    item = Dataset()
    item.CodeValue = "X"
    ds.ReferencedImageSequence = Sequence([item])
    path = _undefine_lengths(write(tmp_path / "s.dcm", ds).read_bytes(), tmp_path / "u.dcm")
    data = path.read_bytes()
    end = data.find(b"\xfe\xff\x0d\xe0")
    assert end > 0
    (tmp_path / "cut.dcm").write_bytes(data[:end])
    with pytest.raises(NotReady, match="delimiter"):
        check(tmp_path / "cut.dcm")


def test_deflate_bomb_is_bounded(tmp_path):
    ref = write(tmp_path / "r.dcm", ct()).read_bytes()
    meta_end = ref.find(b"\x08\x00\x05\x00")
    meta = ref[:meta_end].replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.1.99")
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = c.compress(b"\x08\x00\x05\x00CS\x00\x00" + bytes(300 << 20)) + c.flush()
    (tmp_path / "bomb.dcm").write_bytes(meta + bomb)
    with pytest.raises((Rejected, NotReady)):
        check(tmp_path / "bomb.dcm")


# -- fuzzing: whatever the bytes, validate() answers with a DicomInfo, NotReady or Rejected --

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TEMPLATE = None


def _template() -> bytes:
    global _TEMPLATE
    if _TEMPLATE is None:
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            _TEMPLATE = write(Path(d) / "t.dcm", ct(rows=4, columns=4)).read_bytes()
    return _TEMPLATE


class _Bytes:
    def __init__(self, data):
        self.data, self.size = data, len(data)

    def read_at(self, pos, n):
        return self.data[pos:pos + n]


def _validate_bytes(data: bytes):
    try:
        validate(_Bytes(data))
    except (NotReady, Rejected):
        pass


@settings(max_examples=400, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), max_size=6),
       st.integers(0, 10_000))
def test_fuzzed_files_never_crash_or_hang_the_validator(patches, cut_at):
    data = bytearray(_template())
    for pos, blob in patches:
        pos %= len(data)
        data[pos:pos + len(blob)] = blob
    _validate_bytes(bytes(data[:max(cut_at, 132)]))


@settings(max_examples=200, deadline=1000)
@given(st.binary(max_size=2048))
def test_random_bytes_after_a_valid_preamble_never_crash_the_validator(tail):
    _validate_bytes(b"\0" * 128 + b"DICM" + tail)
