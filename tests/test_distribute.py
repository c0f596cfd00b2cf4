"""Study databases and distribution: on real files, the real CLI and real processes, SQLite and
PostgreSQL. A move changes rows, never bytes; it happens exactly once whoever crashes."""

import datetime
import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import wait_for, write_config_file
from dicomfiles import ct, write
from watcher import models
from watcher.cli import cli
from watcher.config import load
from watcher.models import Event, Instance, Route, Study
from watcher.studies.routine import Routine
from watcher.sweep import sweep


@pytest.fixture
def site(tmp_path, db_url):
    """A config file, its database, and the CLI: ``site.cli(*args, code=0)`` -> output."""
    path = write_config_file(tmp_path, db_url)
    cfg = load(path)
    models.connect(cfg.database.url)

    def invoke(*args, code=0):
        as_json = "--json" in args
        result = CliRunner().invoke(cli, [*args, "--config", str(path)])
        models.connect(cfg.database.url)  # (a read command binds the models read-only)
        assert result.exit_code == code, result.output + repr(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
        return result.stdout if as_json else result.output

    class Site:
        config, config_path, cli = cfg, path, staticmethod(invoke)

        @staticmethod
        def drop(n=1, **attributes):
            """``n`` instances of one new study (unless ``StudyInstanceUID`` is given), imported."""
            study = attributes.pop("study_uid", None) or ct().StudyInstanceUID
            series = attributes.pop("series_uid", None) or ct().SeriesInstanceUID
            files = [write(cfg.watch.drop_dir / f"{study[-12:]}-{series[-6:]}-{i}-{time.monotonic_ns()}.dcm",
                           ct(study_uid=study, series_uid=series, **attributes)) for i in range(n)]
            sweep(cfg, final=True)
            assert not any(f.exists() for f in files)
            models.connect(cfg.database.url)
            return study

        @staticmethod
        def studies(n):
            """``n`` one-instance studies, imported in one scan; their Study Instance UIDs."""
            uids = [ct().StudyInstanceUID for _ in range(n)]
            for i, study in enumerate(uids):
                write(cfg.watch.drop_dir / f"{i:04}.dcm", ct(study_uid=study))
            sweep(cfg, final=True)
            models.connect(cfg.database.url)
            return uids

        @staticmethod
        def json(*args):
            return json.loads(invoke(*args, "--json"))

    yield Site
    models.database.close()


def rows(site, database="all"):
    return site.json("list", "--database", database)


def test_databases_are_created_renamed_listed_and_deleted_only_when_empty(site):
    assert [d["name"] for d in site.json("databases")] == ["import"]
    site.cli("databases", "create", "trial-a", "--description", "Trial A")
    site.cli("databases", "create", "trial-a", code=1)  # taken
    site.cli("databases", "create", "Bad Name", code=1)
    site.cli("databases", "rename", "trial-a", "trial-b")
    site.cli("databases", "rename", "import", "x", code=1)
    site.cli("databases", "delete", "import", code=1)
    study = site.drop(3)
    site.cli("distribute", study, "--to", "trial-b")
    listed = {d["name"]: d for d in site.json("databases")}
    assert listed["trial-b"]["studies"] == 1 and listed["trial-b"]["instances"] == 3
    assert listed["trial-b"]["description"] == "Trial A"
    assert listed["import"]["studies"] == 0 and listed["import"]["patients"] == 0  # its rows are empty
    out = site.cli("databases", "delete", "trial-b", code=1)
    assert "still holds 3 instances" in out
    site.cli("distribute", study, "--from", "trial-b", "--to", "import")
    site.cli("databases", "delete", "trial-b")
    assert [d["name"] for d in site.json("databases")] == ["import"]


def test_a_move_keeps_the_bytes_and_records_who_moved_what_from_where(site):
    site.cli("databases", "create", "trial-a")
    study = site.drop(4)
    other = site.drop(2)
    before = {r["sop_instance_uid"]: r for r in rows(site)}
    summary = site.json("distribute", study, "--to", "trial-a")
    assert summary["moved"] == 4 and summary["conflicts"] == 0
    after = {r["sop_instance_uid"]: r for r in rows(site)}
    assert set(after) == set(before)  # nothing lost, nothing added
    moved = [r for r in after.values() if r["study_instance_uid"] == study]
    assert {r["database"] for r in moved} == {"trial-a"}
    for r in moved:
        assert (r["sha256"], r["stored_path"], r["creator"]) == (
            before[r["sop_instance_uid"]]["sha256"], before[r["sop_instance_uid"]]["stored_path"],
            "folder-scanner")  # the same original file: no bytes copied
        assert r["distributed_by"] and r["distributed_at"] and r["distributed_from"] == "import"
    assert {r["database"] for r in after.values() if r["study_instance_uid"] == other} == {"import"}
    assert len(rows(site, "trial-a")) == 4 and len(rows(site, "import")) == 2
    assert json.loads(site.cli("verify", "--json"))["ok"]
    events = [e for e in site.json("history") if e["outcome"] == "distributed"]
    assert len(events) == 1 and events[0]["source"] == study
    assert "4 instances moved from import to trial-a" in events[0]["detail"]


def test_copy_keeps_the_study_in_both_and_export_hands_it_out_once(site, tmp_path):
    site.cli("databases", "create", "trial-a")
    study = site.drop(3)
    site.cli("distribute", study, "--to", "trial-a", "--copy")
    assert len(rows(site, "import")) == 3 and len(rows(site, "trial-a")) == 3
    quick = {}  # each copy keeps the checksum its downloads are checked against
    for row in Instance.select(Instance.sop_instance_uid, Instance.xxh3):
        quick.setdefault(row.sop_instance_uid, []).append(row.xxh3)
    assert all(len(set(both)) == 1 and both[0] and len(both) == 2 for both in quick.values()), quick
    out = site.json("export", study, str(tmp_path / "out"), "--database", "all")
    assert out["copied"] == 3
    again = site.json("distribute", study, "--to", "trial-a")  # now move: the copies are there
    assert again["present"] == 3 and again["moved"] == 0
    assert len(rows(site, "import")) == 0 and len(rows(site, "trial-a")) == 3


def test_series_and_patient_selections_and_a_dry_run(site):
    site.cli("databases", "create", "trial-a")
    study = site.drop(2)
    series_b = ct().SeriesInstanceUID
    site.drop(3, study_uid=study, series_uid=series_b)
    dry = site.json("distribute", series_b, "--series", "--to", "trial-a", "--dry-run")
    assert dry["studies"] == [{"study_instance_uid": study, "series": [series_b], "instances": 3}]
    assert len(rows(site, "trial-a")) == 0  # a dry run moves nothing
    site.cli("distribute", series_b, "--series", "--to", "trial-a")
    assert {r["series_instance_uid"] for r in rows(site, "trial-a")} == {series_b}
    assert len(rows(site, "import")) == 2  # the study's other series stayed
    site.drop(1, PatientID="PAT-XYZ")
    site.cli("distribute", "PAT-XYZ", "--patient", "--to", "trial-a")
    assert {r["patient_id"] for r in rows(site, "trial-a")} == {"PAT001", "PAT-XYZ"}


def test_unknown_uids_databases_or_nothing_selected_move_nothing(site):
    site.cli("databases", "create", "trial-a")
    study = site.drop(2)
    out = site.cli("distribute", study, "1.2.3.999", "--to", "trial-a", code=1)
    assert "1.2.3.999" in out and "nothing was moved" in out
    assert "no database named 'nope'" in site.cli("distribute", study, "--to", "nope", code=1)
    assert "no database named 'nope'" in site.cli("distribute", study, "--from", "nope",
                                                   "--to", "trial-a", code=1)
    assert "nothing selected" in site.cli("distribute", "--to", "trial-a", code=1)
    site.cli("distribute", study, "--to", "import", code=1)
    assert len(rows(site, "import")) == 2
    site.cli("distribute", study, "--to", "trial-a")
    again = site.json("distribute", study, "--to", "trial-a")  # the same command again
    assert again["already_there"] == [study] and again["moved"] == 0


def test_a_conflict_stays_where_it_is_and_the_rest_of_the_study_moves(site):
    site.cli("databases", "create", "trial-a")
    study = site.drop(3)
    clash = rows(site)[0]
    target = models.StudyDatabase.get(name="trial-a")
    # the target holds the first instance's UID with other bytes (an intake writing there, later)
    other_study = Study.create(database_id=target.id, study_instance_uid="1.2.3.77",
                               patient=Study.get(study_instance_uid=study).patient_id)
    other_series = models.Series.create(database_id=target.id, series_instance_uid="1.2.3.77.1",
                                        study=other_study)
    Instance.create(database_id=target.id, sop_instance_uid=clash["sop_instance_uid"],
                    sop_class_uid="1.2", series=other_series, sha256="0" * 64, size=1,
                    stored_path="x", creator="someone", source="elsewhere", node="n")
    out = site.cli("distribute", study, "--to", "trial-a", code=3)
    assert "conflicts 1" in out
    left = rows(site, "import")
    assert [r["sop_instance_uid"] for r in left] == [clash["sop_instance_uid"]]
    assert "trial-a holds other bytes" in left[0]["conflict"]
    moved = [r for r in rows(site, "trial-a") if r["study_instance_uid"] == study]
    assert len(moved) == 2


def test_late_arrivals_follow_their_study_and_each_move_is_recorded(site):
    site.cli("databases", "create", "trial-a")
    study = site.drop(2)
    site.cli("distribute", study, "--to", "trial-a")
    site.drop(3, study_uid=study)  # the scanner puts them into import, as every intake does
    assert len(rows(site, "import")) == 3
    Routine(site.config).run()
    assert len(rows(site, "import")) == 0
    late = [r for r in rows(site, "trial-a") if r["study_instance_uid"] == study]
    assert len(late) == 5 and all(r["distributed_from"] == "import" for r in late)
    events = [e for e in site.json("history") if e["outcome"] == "distributed"]
    assert len(events) == 2 and "late arrivals" in events[0]["detail"]
    site.cli("distribute", study, "--from", "trial-a", "--to", "import")  # back: no longer followed
    assert Route.get_or_none(Route.study_instance_uid == study) is None


def test_sigkill_during_a_distribution_of_1000_studies_then_the_same_command_moves_each_once(site):
    site.cli("databases", "create", "trial-a")
    studies = site.studies(1000)
    command = [sys.executable, "-m", "watcher", "distribute", *studies, "--to", "trial-a",
               "--config", str(site.config_path)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: Event.select().where(Event.outcome == "distributed").count() >= 100,
                    timeout=60, step=0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    cut = Event.select().where(Event.outcome == "distributed").count()
    assert cut < 1000, "the kill came too late to cut the distribution short"
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    listed = rows(site)
    assert len(listed) == 1000  # nothing lost, nothing doubled
    assert {r["database"] for r in listed} == {"trial-a"}
    assert sorted(r["study_instance_uid"] for r in listed) == sorted(studies)
    assert Event.select().where(Event.outcome == "distributed").count() == 1000  # one per study
    assert json.loads(site.cli("verify", "--json"))["ok"]


def test_two_distributions_of_the_same_studies_at_once_move_each_instance_once(site):
    """Two people run the same command at the same moment: both succeed, nothing doubles; a third
    into another database is refused, naming where the studies are."""
    site.cli("databases", "create", "trial-a")
    site.cli("databases", "create", "trial-b")
    cfg = site.config
    studies = site.studies(200)
    command = [sys.executable, "-m", "watcher", "distribute", *studies, "--to", "trial-a",
               "--config", str(site.config_path), "--json"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    assert all(r.returncode == 0 for r in runs), outs
    moved = sum(json.loads(out)["moved"] for out, _ in outs)
    assert moved == 200  # each instance moved by one of them
    models.connect(cfg.database.url)
    listed = rows(site)
    assert len(listed) == 200 and {r["database"] for r in listed} == {"trial-a"}
    out = site.cli("distribute", studies[0], "--to", "trial-b", code=1)
    assert "in trial-a" in out


def test_a_database_deleted_while_studies_move_into_it_hides_nothing(site):
    site.cli("databases", "create", "trial-a")
    cfg = site.config
    studies = site.studies(300)
    mover = subprocess.Popen([sys.executable, "-m", "watcher", "distribute", *studies, "--to",
                              "trial-a", "--config", str(site.config_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # (a pipe fills)
    deleted, deadline = False, time.monotonic() + 300
    while mover.poll() is None and not deleted:  # an administrator deleting it, again and again
        assert time.monotonic() < deadline, "the distribution did not end"
        deleted = subprocess.run([sys.executable, "-m", "watcher", "databases", "delete", "trial-a",
                                  "--config", str(site.config_path)],
                                 capture_output=True).returncode == 0
    mover.wait(timeout=300)
    models.connect(cfg.database.url)
    listed = rows(site)
    assert len(listed) == 300  # every instance is in a database that exists
    names = {d["name"] for d in site.json("databases")}
    assert {r["database"] for r in listed} <= names


def test_rules_take_stable_studies_and_a_dry_run_says_which_and_why(tmp_path, db_url):
    path = write_config_file(tmp_path, db_url)
    path.write_text(path.read_text() + (
        '[distribute]\nstable_seconds = 60\n'
        '[[distribute.rules]]\nto = "trial-mr"\nmatch = { Modality = "MR" }\n'
        '[[distribute.rules]]\nto = "trial-a"\nname = "trial A"\n'
        'match = { StudyDescription = { regex = "^TRIAL-A" }, folder = "site-a/*" }\n'))
    cfg = load(path)
    models.connect(cfg.database.url)
    runner = CliRunner()
    for name in ("trial-mr", "trial-a"):
        assert runner.invoke(cli, ["databases", "create", name, "--config", str(path)]).exit_code == 0
    models.connect(cfg.database.url)
    write(cfg.watch.drop_dir / "x" / "mr.dcm", ct(Modality="MR"))
    write(cfg.watch.drop_dir / "site-a" / "a.dcm", ct(StudyDescription="TRIAL-A baseline"))
    write(cfg.watch.drop_dir / "site-b" / "b.dcm", ct(StudyDescription="TRIAL-A baseline"))
    sweep(cfg, final=True)
    models.connect(cfg.database.url)
    dry = runner.invoke(cli, ["distribute", "--rules", "--dry-run", "--json", "--config", str(path)])
    models.connect(cfg.database.url)
    plans = json.loads(dry.output)
    assert sorted(p["to"] or "" for p in plans) == ["", "trial-a", "trial-mr"]
    assert any("rule 2 (trial A)" in p["why"] for p in plans)
    now = [models.utcnow()]
    routine = Routine(cfg, clock=lambda: now[0])
    routine.run()
    assert Instance.select().where(Instance.database_id == 1).count() == 3  # not stable yet
    now[0] += datetime.timedelta(seconds=61)
    routine.run()
    by_db = {i.source: i.database_id for i in Instance.select()}
    names = {d.id: d.name for d in models.StudyDatabase.select()}
    assert {k: names[v] for k, v in by_db.items()} == {
        "x/mr.dcm": "trial-mr", "site-a/a.dcm": "trial-a", "site-b/b.dcm": "import"}
    distributed = Event.select().where(Event.outcome == "distributed")
    assert {e.actor for e in distributed} == {"rule 1", "rule 2 (trial A)"}
    models.database.close()


def test_a_rule_naming_an_unknown_database_or_attribute_stops_run_with_a_message(tmp_path, db_url):
    path = write_config_file(tmp_path, db_url)
    base = path.read_text()
    path.write_text(base + '[[distribute.rules]]\nto = "trial-x"\nmatch = { Modality = "MR" }\n')
    run = subprocess.run([sys.executable, "-m", "watcher", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "no study database named 'trial-x'" in run.stderr
    path.write_text(base + '[[distribute.rules]]\nto = "trial-x"\nmatch = { Modalty = "MR" }\n')
    run = subprocess.run([sys.executable, "-m", "watcher", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "Modalty: unknown attribute" in run.stderr


def test_an_existing_catalog_is_carried_forward_into_import(tmp_path, db_url):
    """A database made by the previous version (migrations up to 0004), with instances in it,
    comes up with everything in the Import database."""
    import shutil

    from playhouse import db_url as urls
    from playhouse.migrations import Runner

    old = tmp_path / "old-migrations"
    old.mkdir()
    for path in sorted(models.MIGRATIONS.glob("000[1-4]_*.py")):
        shutil.copy(path, old)
    url = db_url.replace("postgresql://", "psycopg3://")
    db = urls.connect(url)
    Runner(db, str(old)).up()
    p = db.param
    db.execute_sql(f'INSERT INTO "patient" ("patient_id", "issuer", "name", "birth_date", "sex") '
                   f"VALUES ({p}, '', 'A', '', '')", ("PAT1",))
    db.execute_sql(f'INSERT INTO "study" ("study_instance_uid", "patient_id", "study_date", '
                   f'"study_time", "description", "accession_number", "study_id") '
                   f"VALUES ({p}, 1, '', '', 'old', '', '')", ("1.2.3",))
    db.execute_sql(f'INSERT INTO "series" ("series_instance_uid", "study_id", "modality", '
                   f'"description") VALUES ({p}, 1, {p}, {p})', ("1.2.3.1", "CT", ""))
    db.execute_sql(f'INSERT INTO "instance" ("sop_instance_uid", "sop_class_uid", "series_id", '
                   f'"transfer_syntax_uid", "sha256", "size", "stored_path", "creator", "source", '
                   f'"node", "imported_at") VALUES ({p}, {p}, 1, {p}, {p}, 1, {p}, {p}, {p}, {p}, '
                   f"CURRENT_TIMESTAMP)", ("1.2.3.1.1", "1.2", "1.2", "a" * 64, "x", "folder-scanner",
                                           "a.dcm", "n"))
    db.close()
    models.connect(db_url)
    try:
        from watcher.studies import databases
        listed = {d["name"]: d for d in databases.listing()}
        assert listed == {"import": {**listed["import"], "patients": 1, "studies": 1, "series": 1,
                                     "instances": 1}}
        assert Instance.get().database_id == models.IMPORT_ID
        databases.create("trial-a")  # and a study database can be made beside it
    finally:
        models.database.close()
