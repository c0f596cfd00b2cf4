"""Discs: a DICOMDIR is kept like an original and tells whether its disc copy arrived whole."""

import dataclasses
import datetime
import hashlib
import json
import logging
import shutil
import time

import pytest
from click.testing import CliRunner
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from conftest import make_config, wait_for, write_config_file
from dicomfiles import ct
from watcher import discs, models, verify
from watcher.cli import cli
from watcher.models import Disc, Event, Instance
from watcher.service import Service
from watcher.sweep import sweep

FILES = 4


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def burn(folder, n=FILES):
    """A real disc layout written by pydicom's FileSet: DICOMDIR + PT*/ST*/SE*/IM* files.
    Returns the referenced files' paths relative to ``folder``."""
    fs = FileSet()
    study, series = generate_uid(), generate_uid()
    for _ in range(n):
        ds = ct(study_uid=study, series_uid=series)
        ds.preamble = b"\0" * 128
        fs.add(ds)
    fs.write(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != "DICOMDIR")


@pytest.fixture
def cfg(tmp_path, db_url):
    """Config object and its TOML file, both on the same folders and database."""
    overrides = {"watch": {"settle_seconds": 1, "rescan_seconds": 0.5}}
    path = write_config_file(tmp_path, db_url, **overrides)
    config = dataclasses.replace(make_config(tmp_path, db_url, **overrides), path=path)
    models.connect(config.database.url)
    yield config
    models.database.close()


def discs_cli(config, *args):
    """The command in this process: it opens the database read-only, so the test's own
    read-write connection is opened again afterwards, for the scans that follow."""
    try:
        return CliRunner().invoke(cli, ["discs", "--config", str(config.path), *args])
    finally:
        models.connect(config.database.url)


def discs_json(config) -> list:
    result = discs_cli(config, "--json")
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.output)


def copy_disc(tmp_path, drop, keep=None):
    """Burn a disc outside, then copy it into drop/cdrom (only the first ``keep`` files)."""
    disc = tmp_path / "disc"
    files = burn(disc)
    (drop / "cdrom").mkdir(parents=True)
    shutil.copy(disc / "DICOMDIR", drop / "cdrom" / "DICOMDIR")
    for rel in files[:keep]:
        (drop / "cdrom" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(disc / rel, drop / "cdrom" / rel)
    return disc, [f"cdrom/{rel}" for rel in files]


def test_full_disc_copy_keeps_dicomdir_byte_identical_and_is_complete(cfg, tmp_path):
    disc, referenced = copy_disc(tmp_path, cfg.watch.drop_dir)
    data = (disc / "DICOMDIR").read_bytes()
    cut = cfg.watch.drop_dir / referenced[-1]  # a file cut short still got an outcome: rejected
    cut.write_bytes(cut.read_bytes()[:-64])

    sweep(cfg, final=True)

    assert not (cfg.watch.drop_dir / "cdrom" / "DICOMDIR").exists()
    row = Disc.get()
    assert (cfg.archive.dir / row.stored_path).read_bytes() == data
    event = Event.get(Event.source == "cdrom/DICOMDIR")
    assert event.outcome == "dicomdir" and event.sha256 == hashlib.sha256(data).hexdigest()
    assert Instance.select().count() == FILES - 1
    assert not Instance.select().where(Instance.source == "cdrom/DICOMDIR").exists()
    [listed] = discs_json(cfg)
    assert listed["source"] == "cdrom/DICOMDIR" and listed["sha256"] == event.sha256
    assert listed["referenced"] == listed["arrived"] == FILES
    assert listed["missing"] == [] and listed["waiting"] == [] and listed["complete"] is True
    assert listed["arrived_at"]
    found = verify.verify(cfg.archive.dir)  # the kept DICOMDIR is checked, never an orphan
    assert found.checked == FILES and found.orphans == [] and found.ok
    verify.repair(cfg.archive.dir, found)
    assert (cfg.archive.dir / row.stored_path).read_bytes() == data


def test_disc_copy_that_stopped_half_way_lists_what_is_missing(cfg, tmp_path):
    _, referenced = copy_disc(tmp_path, cfg.watch.drop_dir, keep=2)

    sweep(cfg, final=True)

    [listed] = discs_json(cfg)
    assert listed["complete"] is False
    assert (listed["referenced"], listed["arrived"]) == (FILES, 2)
    assert listed["missing"] == referenced[2:]
    text = discs_cli(cfg).output
    assert "INCOMPLETE" in text and f"missing: {referenced[2]}" in text


def test_copier_that_changed_case_and_added_extensions_still_delivered_the_disc(cfg, tmp_path):
    _, referenced = copy_disc(tmp_path, cfg.watch.drop_dir)
    drop = cfg.watch.drop_dir
    lower = drop / referenced[0]
    lower.rename(lower.with_name(lower.name.lower()))
    dotted = drop / referenced[1]
    dotted.rename(dotted.with_name(dotted.name + ".dcm"))

    sweep(cfg, final=True)

    [listed] = discs_json(cfg)
    assert listed["complete"] is True and listed["arrived"] == FILES, listed


def test_file_still_in_the_drop_folder_is_waiting_not_missing(cfg, tmp_path):
    _, referenced = copy_disc(tmp_path, cfg.watch.drop_dir)
    cut = cfg.watch.drop_dir / referenced[0]
    cut.write_bytes(cut.read_bytes()[:-64])  # young and incomplete: it stays pending

    assert sweep(cfg)["pending"] == 1

    [listed] = discs_json(cfg)
    assert listed["waiting"] == [referenced[0]] and listed["missing"] == []
    assert listed["complete"] is False and listed["arrived"] == FILES - 1
    assert discs.warn_incomplete(cfg, "test-node") == 0  # not due, and nothing is missing


def test_dicomdir_dropped_twice_is_a_duplicate_not_a_second_disc(cfg, tmp_path):
    disc, _ = copy_disc(tmp_path, cfg.watch.drop_dir)
    sweep(cfg, final=True)
    again = cfg.watch.drop_dir / "cdrom" / "DICOMDIR"
    again.parent.mkdir(exist_ok=True)
    shutil.copy(disc / "DICOMDIR", again)

    assert sweep(cfg, final=True).get("duplicate") == 1

    assert not again.exists()
    assert Disc.select().count() == 1
    stored = cfg.archive.dir / Disc.get().stored_path
    assert sha(stored) == sha(disc / "DICOMDIR")  # the kept copy is not discarded as the duplicate's
    outcomes = [e.outcome for e in Event.select().where(Event.source == "cdrom/DICOMDIR").order_by(Event.id)]
    assert outcomes == ["dicomdir", "duplicate"]
    assert {e.sha256 for e in Event.select().where(Event.source == "cdrom/DICOMDIR")} == {
        sha(disc / "DICOMDIR")}


def test_service_warns_once_about_a_disc_copy_with_missing_files(cfg, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="watcher.discs")
    _, referenced = copy_disc(tmp_path, cfg.watch.drop_dir, keep=1)

    def warnings():
        return [r.getMessage() for r in caplog.records if r.name == "watcher.discs"]

    with Service(cfg):
        assert wait_for(lambda: Disc.select().count() == 1 and Instance.select().count() == 1)
        assert warnings() == []  # young: the rest of the copy may still come
        old = models.utcnow() - datetime.timedelta(seconds=cfg.watch.incomplete_seconds + 5)
        Disc.update(arrived_at=old).execute()
        assert wait_for(lambda: warnings(), timeout=20)
        time.sleep(2)  # several more rounds (one every rescan_seconds, 0.5 s)
        [message] = warnings()
    assert "cdrom/DICOMDIR" in message and referenced[1] in message and "3 of its 4" in message
    assert Disc.get().warned_at is not None


def test_disc_copied_again_into_another_folder_completes_the_first_copy(cfg, tmp_path):
    disc, referenced = copy_disc(tmp_path, cfg.watch.drop_dir, keep=2)
    sweep(cfg, final=True)
    assert discs_json(cfg)[0]["missing"] == referenced[2:]
    shutil.copytree(disc, cfg.watch.drop_dir / "second try")

    sweep(cfg, final=True)

    [listed] = discs_json(cfg)  # one disc: the second DICOMDIR is a duplicate of the first
    assert listed["source"] == "cdrom/DICOMDIR"
    assert listed["complete"] is True and listed["arrived"] == FILES and listed["missing"] == []
