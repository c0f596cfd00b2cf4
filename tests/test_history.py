"""`history`: all of it in JSON, the newest 100 in text and how many more, filters, a checked --limit."""

import datetime
import json

import pytest
from click.testing import CliRunner

from conftest import write_config_file
from dicomfiles import write
from watcher import catalog, models
from watcher.cli import cli
from watcher.config import load
from watcher.models import Event
from watcher.sweep import sweep


@pytest.fixture
def history(tmp_path, db_url):
    """The database (migrated, as a service leaves it) and `history` through the CLI."""
    path = write_config_file(tmp_path, db_url, watch={"settle_seconds": 1})
    cfg = load(path)
    models.connect(cfg.database.url).close()

    def invoke(*args, code=0):
        result = CliRunner().invoke(cli, ["history", "--config", str(path), *args])
        assert result.exit_code == code, result.output + repr(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
        return result.output

    invoke.config = cfg
    return invoke


def add_events(cfg, n: int, outcome="imported") -> None:
    models.connect(cfg.database.url, migrate=False)
    with models.database.atomic():
        for i in range(n):
            catalog.record_event(outcome, f"file{i:04}.dcm", cfg.import_.node, f"1.2.3.{i}")
    models.database.close()


def test_json_is_never_truncated(history):
    add_events(history.config, 150)
    rows = json.loads(history("--json"))
    assert len(rows) == 150
    assert rows[0]["source"] == "file0149.dcm" and rows[-1]["source"] == "file0000.dcm"


def test_text_shows_the_newest_100_and_says_how_many_more(history):
    add_events(history.config, 150)
    lines = history().splitlines()
    assert len(lines) == 101
    assert "file0149.dcm" in lines[0] and "file0050.dcm" in lines[99]
    assert lines[100] == "… 50 older events not shown; --limit N or --json for all"


def test_older_count_is_written_with_thousands_separators(history):
    add_events(history.config, 1334)
    assert history().splitlines()[-1].startswith("… 1,234 older events not shown")


def test_no_trailer_when_everything_is_shown(history):
    add_events(history.config, 100)
    lines = history().splitlines()
    assert len(lines) == 100 and "older" not in lines[-1]


def test_explicit_limit_is_obeyed_in_text_and_json(history):
    add_events(history.config, 150)
    assert [r["source"] for r in json.loads(history("--json", "--limit", "3"))] == [
        "file0149.dcm", "file0148.dcm", "file0147.dcm"]
    lines = history("--limit", "120").splitlines()
    assert len(lines) == 121 and lines[-1].startswith("… 30 older events not shown")


@pytest.mark.parametrize("limit", ["0", "-1", "many"])
def test_limit_that_is_not_a_positive_integer_is_a_usage_error(history, limit):
    add_events(history.config, 3)
    out = history("--limit", limit, code=2)
    assert "Invalid value for '--limit'" in out


def test_empty_history_says_so(history):
    assert history() == "no events yet\n"
    assert json.loads(history("--json")) == []


def test_since_takes_dates_date_times_with_zones_and_ages(history):
    add_events(history.config, 4)
    models.connect(history.config.database.url, migrate=False)
    now = models.utcnow()
    for i, age in enumerate([datetime.timedelta(days=400), datetime.timedelta(days=2),
                             datetime.timedelta(hours=3), datetime.timedelta(minutes=5)]):
        Event.update(at=now - age).where(Event.source == f"file{i:04}.dcm").execute()
    Event.update(at=datetime.datetime(2024, 5, 1, 11, 30)).where(Event.source == "file0000.dcm").execute()
    models.database.close()

    def sources(*args):
        return [r["source"] for r in json.loads(history("--json", *args))]

    assert sources("--since", "1h") == ["file0003.dcm"]
    assert sources("--since", "4h") == ["file0003.dcm", "file0002.dcm"]
    assert sources("--since", "1w") == ["file0003.dcm", "file0002.dcm", "file0001.dcm"]
    assert len(sources("--since", "2024-05-01")) == 4  # a date: from its midnight, UTC
    assert len(sources("--since", "2024-05-01T11:30")) == 4  # UTC when no zone is given
    assert len(sources("--since", "2024-05-01T11:31")) == 3
    assert len(sources("--since", "2024-05-01T13:30+02:00")) == 4  # = 11:30 UTC
    assert len(sources("--since", "2024-05-01T13:31+02:00")) == 3
    assert "file0000.dcm" not in history("--since", "2024-05-02")
    assert "Invalid value for '--since'" in history("--since", "yesterday", code=2)


def test_outcome_filter_is_repeatable_and_checked(history, tmp_path):
    cfg = history.config
    write(cfg.watch.drop_dir / "a.dcm")
    (cfg.watch.drop_dir / "b.dcm").write_bytes((cfg.watch.drop_dir / "a.dcm").read_bytes())
    (cfg.watch.drop_dir / "notes.txt").write_text("not DICOM")
    models.connect(cfg.database.url)
    counts = sweep(cfg, final=True)
    models.database.close()
    assert (counts["imported"], counts["duplicate"], counts["rejected"]) == (1, 1, 1)

    def outcomes(*args):
        return sorted((r["outcome"], r["source"]) for r in json.loads(history("--json", *args)))

    assert outcomes("--outcome", "rejected") == [("rejected", "notes.txt")]
    assert [o for o, _ in outcomes("--outcome", "imported", "--outcome", "duplicate")] == [
        "duplicate", "imported"]
    assert outcomes("--outcome", "retried") == []
    assert "no events match" in history("--outcome", "retried")
    out = history("--outcome", "conflict", code=2)
    assert "Invalid value for '--outcome'" in out and "rejected" in out
