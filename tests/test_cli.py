"""The CLI on a real drop folder: scan, then ask what came in and what did not."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner

from conftest import write_config_file
from dicomfiles import write
from watcher import models
from watcher.cli import cli

SAMPLE = Path(__file__).resolve().parent.parent / "sample_drop"


@pytest.fixture
def run(tmp_path, db_url):
    cfg = write_config_file(tmp_path, db_url, watch={"settle_seconds": 1})
    runner = CliRunner()

    def invoke(*args, code=0):
        result = runner.invoke(cli, [args[0], "--config", str(cfg), *args[1:]])
        assert result.exit_code == code, result.output + repr(result.exception)
        return result.output

    invoke.tmp = tmp_path
    return invoke


def tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and p.name != "README.md"}


def test_scan_of_sample_drop_accounts_for_every_file_byte_for_byte(run):
    drop = run.tmp / "drop"
    shutil.copytree(SAMPLE, drop, dirs_exist_ok=True)
    (drop / "README.md").unlink()
    dropped = tree_hashes(drop)

    out = run("scan", "--final")
    assert "imported 14, duplicates 0, dicomdir 1, rejected 4, pending 0" in out
    assert list(drop.iterdir()) == []  # emptied sub-folders removed too

    listed = json.loads(run("list", "--json"))
    rejects = json.loads(run("rejects", "--json"))
    history = json.loads(run("history", "--json", "--limit", "1000"))
    assert {i["source"] for i in listed} | {r["source"] for r in rejects} | {
        h["source"] for h in history if h["outcome"] == "dicomdir"} == set(dropped)
    for i in listed:  # every stored original is the dropped file, unmodified
        assert hashlib.sha256(Path(i["stored_path"]).read_bytes()).hexdigest() == dropped[i["source"]]
        assert i["sha256"] == dropped[i["source"]] and i["creator"] == "folder-scanner"
    for r in rejects:  # every rejected file is kept, unmodified
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == dropped[r["source"]]
    [disc] = json.loads(run("discs", "--json"))  # the DICOMDIR is kept, unmodified, and its disc whole
    assert disc["source"] == "cdrom/DICOMDIR" and disc["sha256"] == dropped["cdrom/DICOMDIR"]
    assert hashlib.sha256(Path(disc["stored_path"]).read_bytes()).hexdigest() == dropped["cdrom/DICOMDIR"]
    assert [h["sha256"] for h in history if h["outcome"] == "dicomdir"] == [dropped["cdrom/DICOMDIR"]]
    assert (disc["referenced"], disc["arrived"], disc["missing"], disc["complete"]) == (4, 4, [], True)
    assert {r["source"]: r["reason"] for r in rejects} == {
        "cdrom/AUTORUN.INF": "not-dicom", "cdrom/README.TXT": "not-dicom",
        "cdrom/VIEWER/VIEWER.EXE": "not-dicom", "broken/truncated.dcm": "truncated"}

    status = json.loads(run("status", "--json"))
    assert (status["patients"], status["studies"], status["series"], status["instances"],
            status["rejected"]) == (3, 3, 4, 14, 4)
    assert "Patient DEMO-0001" in run("list")
    assert "checked 15, missing 0, mismatched 0, orphans 0" in run("verify")  # 14 + the DICOMDIR


def test_scan_leaves_incomplete_young_file_pending(run):
    full = write(run.tmp / "full.dcm").read_bytes()
    (run.tmp / "drop" / "part.dcm").write_bytes(full[:len(full) // 2])
    assert "pending 1" in run("scan")
    assert (run.tmp / "drop" / "part.dcm").exists()


def test_json_keys_are_the_documented_ones(run):
    write(run.tmp / "drop" / "a.dcm")
    (run.tmp / "drop" / "junk.txt").write_text("not an image " * 20)
    run("scan")
    assert set(json.loads(run("list", "--json"))[0]) >= {
        "sop_instance_uid", "sop_class_uid", "series_instance_uid", "study_instance_uid",
        "patient_id", "sha256", "size", "creator", "stored_path", "source", "imported_at"}
    assert set(json.loads(run("rejects", "--json"))[0]) >= {
        "source", "reason", "detail", "path", "sha256", "rejected_at"}
    assert set(json.loads(run("history", "--json"))[0]) >= {
        "at", "outcome", "source", "sop_instance_uid", "sha256", "reason"}
    assert set(json.loads(run("status", "--json"))) >= {
        "patients", "studies", "series", "instances", "rejected"}


def test_retry_puts_rejected_files_back_at_their_path(run):
    sub = run.tmp / "drop" / "sub"
    sub.mkdir()
    (sub / "notes.txt").write_text("x" * 300)
    run("scan")
    assert not (sub / "notes.txt").exists()
    assert "1 files put back" in run("retry", "sub/notes.txt")
    assert (sub / "notes.txt").read_text() == "x" * 300
    assert json.loads(run("rejects", "--json")) == []
    assert json.loads(run("history", "--json"))[0]["outcome"] == "retried"


def test_export_copies_originals_of_a_study(run):
    a = write(run.tmp / "drop" / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.1")
    b = write(run.tmp / "drop" / "b.dcm", study_uid="1.2.3", series_uid="1.2.3.2")
    originals = {a.read_bytes(), b.read_bytes()}
    run("scan")
    assert "2 files copied" in run("export", "1.2.3", str(run.tmp / "out"))
    assert {p.read_bytes() for p in (run.tmp / "out").rglob("*.dcm")} == originals
    run("export", "9.9.9", str(run.tmp / "none"), code=1)


def test_export_never_replaces_a_different_file_and_refuses_a_damaged_original(run):
    a = write(run.tmp / "drop" / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.1")
    original = a.read_bytes()
    run("scan")
    row = json.loads(run("list", "--json"))[0]
    out = run.tmp / "out"
    target = out / "1.2.3" / "1.2.3.1" / f"{row['sop_instance_uid']}.dcm"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"someone else's file")
    assert "exists with other bytes" in run("export", "1.2.3", str(out), code=1)
    assert target.read_bytes() == b"someone else's file"
    target.unlink()
    assert "1 files copied" in run("export", "1.2.3", str(out))
    assert "1 files copied" in run("export", "1.2.3", str(out))  # the same bytes again: fine
    assert target.read_bytes() == original
    stored = Path(row["stored_path"])
    stored.chmod(0o644)
    stored.write_bytes(original[:-1] + b"X")
    damaged = run.tmp / "out2"
    said = run("export", "1.2.3", str(damaged), code=1)
    assert str(stored) in said and "no longer matches" in said
    assert not [p for p in damaged.rglob("*") if p.is_file()]  # nothing handed out
    stored.unlink()
    assert "is missing" in run("export", "1.2.3", str(run.tmp / "out3"), code=1)


def test_verify_reports_a_damaged_original_and_fails(run):
    write(run.tmp / "drop" / "a.dcm")
    run("scan")
    stored = Path(json.loads(run("list", "--json"))[0]["stored_path"])
    stored.chmod(0o644)
    stored.write_bytes(stored.read_bytes()[:-1] + b"X")
    assert "mismatched 1" in run("verify", code=1)


def test_each_original_keeps_the_quick_checksum_of_its_bytes_and_verify_checks_it(run, db_url):
    """A small file (read whole) and a large one (read in chunks) record the xxh3 that a
    download checks; verify holds each file against it too: a row whose xxh3 does not match
    its file is mismatched, even when the sha256 does."""
    write(run.tmp / "drop" / "small.dcm")
    write(run.tmp / "drop" / "large.dcm", rows=1536, columns=1536)  # 4.7 MB: past WHOLE_FILE_LIMIT
    run("scan")
    listed = json.loads(run("list", "--json"))
    assert len(listed) == 2
    models.connect(db_url)  # list rebinds the database read-only
    for row in models.Instance.select():
        stored = run.tmp / "archive" / row.stored_path
        assert row.xxh3 == xxhash.xxh3_128(stored.read_bytes()).hexdigest(), row.source
    assert "mismatched 0" in run("verify")

    models.connect(db_url)
    models.Instance.update(xxh3="0" * 32).where(models.Instance.source == "large.dcm").execute()
    assert "mismatched 1" in run("verify", code=1)
    models.connect(db_url)
    models.Instance.update(xxh3=None).execute()  # rows from before xxh3: the sha256 alone
    assert "mismatched 0" in run("verify")


def test_unknown_config_key_is_a_clear_error(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[watch]\ndrop_dir = "d"\nsettle_secs = 3\n[archive]\ndir = "a"\nrejected_dir = "r"\n')
    result = CliRunner().invoke(cli, ["status", "--config", str(cfg)])
    assert result.exit_code != 0 and "watch.settle_secs" in result.output
