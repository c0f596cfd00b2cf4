"""A config file that cannot be used is a message saying why, never a traceback."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_config_file
from watcher.cli import cli

IS_ROOT = os.geteuid() == 0


def via_env(config_path, command="status"):
    result = CliRunner().invoke(cli, [command], env={"WATCHER_CONFIG": str(config_path)})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def test_config_naming_a_folder_is_a_message(tmp_path):
    result = via_env(tmp_path)
    assert result.exit_code == 1
    assert f"config file {tmp_path} is a folder; name the TOML file in it" in result.output
    result = CliRunner().invoke(cli, ["status", "--config", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_missing_config_is_a_message(tmp_path):
    result = via_env(tmp_path / "nope.toml")
    assert result.exit_code == 1 and f"config file {tmp_path}/nope.toml not found" in result.output


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_config_says_it_is_not_utf8(tmp_path, encoding):
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    path.write_bytes(("\ufeff" + path.read_text()).encode(encoding))  # with a byte-order mark
    result = via_env(path)
    assert result.exit_code == 1 and "is UTF-16, not UTF-8: save it as UTF-8" in result.output


def test_utf16_config_without_byte_order_mark_says_it_is_not_utf8(tmp_path):
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    path.write_bytes(path.read_text().encode("utf-16-le"))
    result = via_env(path)
    assert result.exit_code == 1 and "is not UTF-8 text" in result.output


def test_latin1_config_names_the_line(tmp_path):
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    path.write_bytes(path.read_bytes() + "# Müller\n".encode("latin-1"))
    lines = path.read_bytes().count(b"\n")
    result = via_env(path)
    assert result.exit_code == 1 and f"is not UTF-8 text (line {lines}): save it as UTF-8" in result.output


def test_utf8_config_with_byte_order_mark_is_read(tmp_path):
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = via_env(path, "scan")
    assert result.exit_code == 0, result.output


def test_section_given_as_a_value_is_a_message(tmp_path):
    path = tmp_path / "w.toml"
    path.write_text('watch = "drop"\n')
    result = via_env(path)
    assert result.exit_code == 1 and "watch must be a section ([watch]), not a value" in result.output


def test_config_the_user_may_not_read_is_a_message(tmp_path):
    if not IS_ROOT or not shutil.which("setpriv"):
        pytest.skip("needs root to run the command as another user")
    import watcher
    for place in (tmp_path, Path(watcher.__file__).parent, Path(sys.prefix)):
        for parent in place.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    os.chmod(tmp_path, 0o755)
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    os.chmod(path, 0o600)
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "watcher", "status"],
                          env={**os.environ, "WATCHER_CONFIG": str(path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"config file {path} cannot be read: Permission denied" in proc.stderr
