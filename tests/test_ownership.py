"""One archive, one catalog: a second site whose config names the same archive folder but
another catalog (a config copied and half edited) is refused by every command that may write,
before it can take the first site's originals for orphans."""

import subprocess
import sys

from click.testing import CliRunner

from conftest import write_config_file
from dicomfiles import ct, write
from watcher import models
from watcher.archive import OWNER_MARK
from watcher.cli import cli


def run_cli(config, *args):
    result = CliRunner().invoke(cli, [args[0], "--config", str(config), *args[1:]])
    models.database.close()
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def two_sites(tmp_path):
    """Site A with one imported original; site B: its own catalog, A's archive."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_config_file(tmp_path / "a", f"sqlite:///{tmp_path}/a/watcher.db")
    archive = tmp_path / "a" / "archive"
    b = write_config_file(tmp_path / "b", f"sqlite:///{tmp_path}/b/watcher.db",
                          archive={"dir": str(archive), "rejected_dir": str(tmp_path / "b" / "rejected")})
    write(tmp_path / "a" / "drop" / "one.dcm", ct())
    assert run_cli(a, "scan", "--final").exit_code == 0
    originals = sorted(p for p in archive.rglob("*.dcm"))
    assert len(originals) == 1
    return a, b, archive, originals


def test_a_second_catalog_on_the_same_archive_is_refused_and_removes_nothing(tmp_path):
    a, b, archive, originals = two_sites(tmp_path)
    for args in (["verify", "--repair"], ["scan", "--final"]):
        result = run_cli(b, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "belongs to another catalog" in result.output and OWNER_MARK in result.output
    service = subprocess.run([sys.executable, "-m", "watcher", "run", "--config", str(b)],
                             capture_output=True, text=True, timeout=60)
    assert service.returncode != 0 and "belongs to another catalog" in service.stderr
    assert sorted(p for p in archive.rglob("*.dcm")) == originals
    check = run_cli(a, "verify", "--json")
    assert check.exit_code == 0, check.output  # A's archive is whole; its mark is no orphan
    assert run_cli(b, "status").exit_code == 0  # (a command that only reads still answers)


def test_the_mark_is_made_on_first_use_and_put_back_for_its_own_catalog(tmp_path):
    a, _, archive, originals = two_sites(tmp_path)
    mark = archive / OWNER_MARK
    first = mark.read_text()
    mark.unlink()  # removed by someone: the catalog still knows its id
    assert run_cli(a, "verify", "--repair").exit_code == 0
    assert mark.read_text() == first
    assert sorted(p for p in archive.rglob("*.dcm")) == originals


def test_a_new_catalog_on_a_marked_archive_is_refused_until_the_mark_is_removed(tmp_path):
    a, _, archive, originals = two_sites(tmp_path)
    (tmp_path / "a" / "watcher.db").unlink()  # the catalog lost, the archive kept
    for leftover in (tmp_path / "a").glob("watcher.db-*"):
        leftover.unlink()
    refused = run_cli(a, "verify", "--repair")
    assert refused.exit_code == 1 and "belongs to another catalog" in refused.output
    assert sorted(p for p in archive.rglob("*.dcm")) == originals
    assert "remove" in refused.output and str(archive / OWNER_MARK) in refused.output  # the way out
