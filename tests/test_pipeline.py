"""ingest(): a dropped file becomes a verified original and a row, or a kept, explained rejection."""

import hashlib
import os
import socket

import pytest

from dicomfiles import bundled, ct, write, write_bare
from watcher.models import Event, Instance, Rejection, Series, Study
from watcher.pipeline import ingest


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_imports_original_bytes_and_removes_source(config):
    src = write(config.watch.drop_dir / "a.dcm")
    original = src.read_bytes()
    outcome = ingest(src, config)
    assert outcome.outcome == "imported"
    assert not src.exists()
    row = Instance.get()
    stored = config.archive.dir / row.stored_path
    assert stored.read_bytes() == original
    assert row.sha256 == hashlib.sha256(original).hexdigest()
    assert row.creator == "folder-scanner" and row.source == "a.dcm" and row.node == "test-node"
    assert Event.get().outcome == "imported"


def test_study_series_and_patient_attributes_are_recorded(config):
    ds = ct(patient_id="PX", Modality="PT", StudyDescription="FDG whole body")
    ingest(write(config.watch.drop_dir / "p.dcm", ds), config)
    series = Series.get()
    assert series.modality == "PT" and series.series_number == 2
    assert series.study.description == "FDG whole body"
    assert series.study.patient.patient_id == "PX" and series.study.patient.name == "Müller^Anna"


def test_duplicate_with_same_bytes_is_a_no_op(config):
    src = write(config.watch.drop_dir / "a.dcm")
    data = src.read_bytes()
    ingest(src, config)
    again = config.watch.drop_dir / "again" / "copy.dcm"
    again.parent.mkdir()
    again.write_bytes(data)
    outcome = ingest(again, config)
    assert outcome.outcome == "duplicate"
    assert not again.exists()
    assert Instance.select().count() == 1
    assert [e.outcome for e in Event.select().order_by(Event.id)] == ["imported", "duplicate"]


def test_same_uid_with_other_bytes_is_a_conflict_and_first_stays(config):
    ds = ct()
    first = write(config.watch.drop_dir / "first.dcm", ds)
    first_sha = sha(first)
    ingest(first, config)
    ds.InstitutionName = "transcoded elsewhere"
    second = write(config.watch.drop_dir / "second.dcm", ds)
    second_sha = sha(second)
    outcome = ingest(second, config)
    assert outcome.outcome == "rejected" and outcome.reason == "conflict"
    assert first_sha in outcome.detail and second_sha in outcome.detail
    assert Instance.get().sha256 == first_sha
    kept = config.archive.rejected_dir / "second.dcm"
    assert sha(kept) == second_sha
    assert not list(config.archive.dir.rglob(f"{second_sha}*"))


def test_rejected_file_is_kept_byte_identical_with_reason(config):
    junk = config.watch.drop_dir / "cd" / "AUTORUN.INF"
    junk.parent.mkdir()
    junk.write_bytes(b"[autorun]\nopen=viewer.exe\n" * 10)
    data = junk.read_bytes()
    outcome = ingest(junk, config)
    assert outcome.reason == "not-dicom"
    kept = config.archive.rejected_dir / "cd" / "AUTORUN.INF"
    assert kept.read_bytes() == data
    r = Rejection.get()
    assert (r.source, r.reason, r.path, r.sha256) == ("cd/AUTORUN.INF", "not-dicom", str(kept),
                                                      hashlib.sha256(data).hexdigest())
    assert "DICM" in r.detail


def test_same_name_rejected_twice_keeps_both(config):
    for _ in range(2):
        junk = config.watch.drop_dir / "README.TXT"
        junk.write_text("x" * 200)
        ingest(junk, config)
    names = sorted(p.name for p in config.archive.rejected_dir.iterdir())
    assert names == ["README.TXT", "README.TXT.1"]
    assert Rejection.select().count() == 2


def test_dicomdir_is_recorded_and_disposed_not_imported(config):
    src = config.watch.drop_dir / "DICOMDIR"
    src.write_bytes(bundled("DICOMDIR").read_bytes())
    outcome = ingest(src, config)
    assert outcome.outcome == "dicomdir"
    assert not src.exists()
    assert Instance.select().count() == 0
    assert Event.get().outcome == "dicomdir"


@pytest.mark.parametrize("disguise", ["directory record sequence", "DICOMDIR class in the file meta"])
def test_image_that_looks_like_a_dicomdir_is_judged_as_an_image(config, disguise):
    """Only Media Storage Directory Storage with its record sequence is a disc index: a CT
    with Pixel Data wearing one of its marks is an instance, never deleted unstored."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    ds = ct()
    if disguise == "directory record sequence":
        ds.DirectoryRecordSequence = Sequence([Dataset()])
    else:
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    src = write(config.watch.drop_dir / "DICOMDIR", ds)
    data = src.read_bytes()
    outcome = ingest(src, config)
    assert outcome.outcome == "imported", outcome
    assert (config.archive.dir / Instance.get().stored_path).read_bytes() == data


def test_symlink_is_rejected_and_its_target_untouched(config, tmp_path):
    target = write(tmp_path / "outside" / "real.dcm")
    before = target.read_bytes()
    link = config.watch.drop_dir / "link.dcm"
    link.symlink_to(target)
    outcome = ingest(link, config)
    assert outcome.reason == "symlink"
    assert target.read_bytes() == before
    moved = config.archive.rejected_dir / "link.dcm"
    assert moved.is_symlink() and os.readlink(moved) == str(target)
    assert Instance.select().count() == 0


def test_dangling_and_folder_symlinks_are_rejected(config, tmp_path):
    (config.watch.drop_dir / "dangling").symlink_to(tmp_path / "nothing")
    (config.watch.drop_dir / "folder").symlink_to(tmp_path)
    for name in ("dangling", "folder"):
        assert ingest(config.watch.drop_dir / name, config).reason == "symlink"
    assert (tmp_path / "drop").exists()


def test_fifo_and_socket_are_special_files(config):
    fifo = config.watch.drop_dir / "pipe"
    os.mkfifo(fifo)
    assert ingest(fifo, config).reason == "special-file"
    sock_path = config.watch.drop_dir / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert ingest(sock_path, config).reason == "special-file"


def test_unicode_space_and_nested_names(config):
    names = ["Ünïcödé ñame.dcm", "with space/and more/IMG 1", "a/b/c/d/e/f/IMG00001", "-leading.dcm"]
    for name in names:
        write(config.watch.drop_dir / name)
    for name in names:
        assert ingest(config.watch.drop_dir / name, config).outcome == "imported"
    assert sorted(i.source for i in Instance.select()) == sorted(names)


def test_preamble_less_dataset_is_imported_as_is(config):
    src = write_bare(config.watch.drop_dir / "DICOM" / "IMG00001")
    data = src.read_bytes()
    assert ingest(src, config).outcome == "imported"
    assert (config.archive.dir / Instance.get().stored_path).read_bytes() == data


def test_young_incomplete_file_stays_pending_then_is_rejected_as_truncated(config):
    full = write(config.archive.dir.parent / "full.dcm")
    part = config.watch.drop_dir / "part.dcm"
    part.write_bytes(full.read_bytes()[:300])
    assert ingest(part, config).outcome == "pending"
    assert part.exists() and Rejection.select().count() == 0
    outcome = ingest(part, config, final=True)
    assert outcome.reason == "truncated"
    assert (config.archive.rejected_dir / "part.dcm").stat().st_size == 300


def test_move_on_success_keeps_a_copy_in_done_dir(tmp_path, db_url):
    from conftest import make_config
    from watcher import models
    cfg = make_config(tmp_path, db_url, archive={"on_success": "move", "done_dir": "done"})
    models.connect(cfg.database.url)
    src = write(cfg.watch.drop_dir / "x" / "a.dcm")
    data = src.read_bytes()
    assert ingest(src, cfg).outcome == "imported"
    assert (tmp_path / "done" / "x" / "a.dcm").read_bytes() == data


def test_study_shared_by_many_instances_is_one_row(config):
    study, series = "1.2.3.4", "1.2.3.4.5"
    for i in range(5):
        ingest(write(config.watch.drop_dir / f"{i}.dcm", study_uid=study, series_uid=series), config)
    assert Study.select().count() == 1 and Series.select().count() == 1
    assert Instance.select().count() == 5


def test_file_that_vanishes_before_import_is_noted_not_rejected(config):
    src = write(config.watch.drop_dir / "gone.dcm")
    src.unlink()
    outcome = ingest(src, config)
    assert outcome.outcome == "vanished"
    assert Rejection.select().count() == 0 and Instance.select().count() == 0


def test_file_written_to_while_being_read_is_not_trusted(config):
    from watcher.source import Source
    src = write(config.watch.drop_dir / "growing.dcm")
    with Source(config.watch.drop_dir, src.name) as source:
        assert not source.changed()
        with open(src, "ab") as f:
            f.write(b"\0\0")
        assert source.changed()


def test_file_replaced_under_the_same_name_is_not_trusted(config):
    from watcher.source import Source
    src = write(config.watch.drop_dir / "swap.dcm")
    with Source(config.watch.drop_dir, src.name) as source:
        other = write(config.watch.drop_dir / "other.dcm")
        os.replace(other, src)
        assert source.changed()


def test_files_ingested_together_each_get_their_own_outcome(config):
    from watcher.pipeline import ingest_together
    drop = config.watch.drop_dir
    good = write(drop / "a.dcm")
    copy = drop / "copy" / "a.dcm"
    copy.parent.mkdir()
    copy.write_bytes(good.read_bytes())
    ds = ct(sop_uid="1.2.826.0.1.3680043.99.42")
    first = write(drop / "first.dcm", ds)
    ds.InstitutionName = "edited"
    second = write(drop / "second.dcm", ds)
    junk = drop / "junk.txt"
    junk.write_bytes(b"not dicom " * 30)
    cut = write(drop / "cut.dcm")
    cut.write_bytes(cut.read_bytes()[:-100])
    paths = [good, copy, first, second, junk, cut]
    outcomes = ingest_together([(p, False, 1) for p in paths], config)  # one commit for all
    assert [(o.outcome, o.reason) for o in outcomes] == [
        ("imported", None), ("duplicate", None), ("imported", None), ("rejected", "conflict"),
        ("rejected", "not-dicom"), ("pending", None)]
    assert Instance.select().count() == 2
    assert [p.exists() for p in paths] == [False, False, False, False, False, True]
    assert sorted(r.reason for r in Rejection.select()) == ["conflict", "not-dicom"]


def incoming_objects(config, n: int) -> list:
    """``n`` objects that arrived whole (as a replication's fetches), in the archive's
    incoming folder; -> (path, bytes) pairs."""
    folder = config.archive.dir / ".incoming" / "test"
    folder.mkdir(parents=True)
    return [(p, p.read_bytes()) for p in (write(folder / f"{i}.dcm") for i in range(n))]


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_objects_ingested_together_are_synced_at_once_and_named_only_then(config, monkeypatch, syncfs):
    """A batch of objects is stored unsynced under temporary names, made durable by one sync
    (an fsync each on a kernel whose syncfs reports no error), and only then given the final
    names a row points at."""
    from watcher import archive
    from watcher.origin import from_replication
    from watcher.pipeline import ingest_objects
    monkeypatch.setattr(archive, "SYNCFS_REPORTS_ERRORS", syncfs)
    objects = incoming_objects(config, 3)
    origin = from_replication("someone", "http://127.0.0.1:1/dicom-web/")
    outcomes = ingest_objects([dict(path=p, origin=origin) for p, _ in objects], config)
    assert [o.outcome for o in outcomes] == ["imported"] * 3
    for path, data in objects:
        row = Instance.get(Instance.sha256 == hashlib.sha256(data).hexdigest())
        stored = config.archive.dir / row.stored_path
        assert stored.read_bytes() == data and stored.stat().st_ino == path.stat().st_ino  # shared
    assert not list((config.archive.dir / ".tmp").iterdir())


def test_a_batch_that_cannot_be_named_leaves_no_temporary_and_no_row(config):
    """The day's folder cannot be made (a dangling link is in its way): every object of the
    batch fails with the error, no row is written, and none of its temporaries is left behind."""
    import datetime
    from watcher import archive
    from watcher.origin import from_replication
    from watcher.pipeline import ingest_objects
    objects = incoming_objects(config, 3)
    year = config.archive.dir / f"{datetime.datetime.now(datetime.timezone.utc):%Y}"
    year.symlink_to(config.archive.dir / "gone")
    archive._known_dirs.clear()  # (another test of this process may have made the day's folder)
    origin = from_replication("someone", "http://127.0.0.1:1/dicom-web/")
    outcomes = ingest_objects([dict(path=p, origin=origin) for p, _ in objects], config)
    assert all(isinstance(o, FileNotFoundError) for o in outcomes), outcomes
    assert not Instance.select().exists()
    assert not list((config.archive.dir / ".tmp").iterdir())
    assert [p.read_bytes() for p, _ in objects] == [data for _, data in objects]  # the sender's, untouched


@pytest.mark.parametrize("together", [False, True], ids=["one", "batch"])
def test_a_conflict_that_arrived_whole_is_kept_as_rejected_and_not_in_the_archive(config, together):
    """Other bytes under a SOP Instance UID already imported, received (a C-STORE) or fetched (a
    replication's batch): kept in rejected_dir with reason conflict, and the archive holds the
    first original only (no orphan of the newcomer's bytes left for ``verify --repair``)."""
    from watcher.origin import from_dicom
    from watcher.pipeline import ingest_object, ingest_objects
    folder = config.archive.dir / ".incoming" / "test"
    folder.mkdir(parents=True)
    ds = ct(sop_uid="1.2.826.0.1.3680043.99.77")
    first = write(folder / "first.dcm", ds)
    origin = from_dicom("dicom-server", "SCU", "ARCHIVE", "127.0.0.1")
    assert ingest_object(first, origin, config).outcome == "imported"
    ds.InstitutionName = "other"
    other = write(folder / "other.dcm", ds)
    data = other.read_bytes()
    if together:
        [outcome] = ingest_objects([dict(path=other, origin=origin)], config)
    else:
        outcome = ingest_object(other, origin, config)
    assert (outcome.outcome, outcome.reason) == ("rejected", "conflict")
    [kept] = [p for p in config.archive.rejected_dir.rglob("*") if p.is_file()]
    assert kept.read_bytes() == data
    stored = [p for p in config.archive.dir.rglob("*.dcm") if ".incoming" not in p.parts]
    assert [p.name for p in stored] == [f"{Instance.get().sha256}.dcm"]
    assert not list((config.archive.dir / ".tmp").iterdir())
