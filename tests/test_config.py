"""Risky configs are refused, each error naming the key: folders inside one another, the SQLite
file or the config file inside a folder the service empties, a drop folder that does not exist,
settle/incomplete times too short to tell a finished file from one being written, typos."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from watcher.config import MIN_INCOMPLETE_SECONDS, MIN_SETTLE_SECONDS, from_dict, load
from watcher.errors import ConfigError


def valid(tmp_path: Path) -> dict:
    return {"watch": {"drop_dir": "drop", "settle_seconds": 1, "incomplete_seconds": 60},
            "archive": {"dir": "archive", "rejected_dir": "rejected"},
            "database": {"url": f"sqlite:///{tmp_path}/db/watcher.db"},
            "import": {"node": "test-node"}}


def toml(data: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {value(v)}" for key, v in values.items()]
    return "\n".join(lines) + "\n"


def move_archive(**values):
    def change(tmp_path, data):
        data["archive"].update(values)
    return change


def set_(section, **values):
    def change(tmp_path, data):
        data.setdefault(section, {}).update(values)
    return change


def sqlite_at(rel):
    def change(tmp_path, data):
        data["database"]["url"] = f"sqlite:///{tmp_path}/{rel}"
    return change


def rejected_dir_through_a_link_into_archive(tmp_path, data):
    (tmp_path / "archive" / "r").mkdir(parents=True)
    os.symlink(tmp_path / "archive" / "r", tmp_path / "rejected-link")
    data["archive"]["rejected_dir"] = "rejected-link"


def sqlite_through_a_link_into_drop(tmp_path, data):
    (tmp_path / "drop").mkdir()
    os.symlink(tmp_path / "drop", tmp_path / "db-link")
    data["database"]["url"] = f"sqlite:///{tmp_path}/db-link/watcher.db"


def default_sqlite_with_drop_dir_the_config_folder(tmp_path, data):
    del data["database"]  # the default: watcher.db beside the config, i.e. in the drop folder
    data["watch"]["drop_dir"] = "."
    data["archive"].update({"dir": "../archive", "rejected_dir": "../rejected"})


def typo(section, wrong, right=None):
    def change(tmp_path, data):
        values = data.setdefault(section, {})
        values[wrong] = values.pop(right) if right in values else 1
    return change


REFUSED = [
    # folders inside one another (verify --repair deletes what no row references; the drop
    # folder is emptied): each of them names both keys
    pytest.param(move_archive(rejected_dir="archive/rejected"), ["archive.rejected_dir", "archive.dir"],
                 id="rejected_dir-inside-archive.dir"),
    pytest.param(move_archive(on_success="move", done_dir="archive/done"), ["archive.done_dir", "archive.dir"],
                 id="done_dir-inside-archive.dir"),
    pytest.param(move_archive(dir="rejected/archive"), ["archive.dir", "archive.rejected_dir"],
                 id="archive.dir-inside-rejected_dir"),
    pytest.param(move_archive(on_success="move", done_dir="drop/done"), ["archive.done_dir", "watch.drop_dir"],
                 id="done_dir-inside-drop_dir"),
    pytest.param(move_archive(on_success="move", done_dir="rejected/done"),
                 ["archive.done_dir", "archive.rejected_dir"], id="done_dir-inside-rejected_dir"),
    pytest.param(move_archive(on_success="move", done_dir="rejected"),
                 ["archive.done_dir", "archive.rejected_dir"], id="done_dir-is-rejected_dir"),
    pytest.param(move_archive(dir="drop/archive"), ["archive.dir", "watch.drop_dir"], id="archive.dir-inside-drop_dir"),
    pytest.param(move_archive(rejected_dir="drop/rejected"), ["archive.rejected_dir", "watch.drop_dir"],
                 id="rejected_dir-inside-drop_dir"),
    pytest.param(set_("watch", drop_dir="archive/drop"), ["archive.dir", "watch.drop_dir"],
                 id="drop_dir-inside-archive.dir"),
    pytest.param(set_("watch", drop_dir="rejected"), ["archive.rejected_dir", "watch.drop_dir"],
                 id="drop_dir-is-rejected_dir"),
    pytest.param(set_("watch", drop_dir="."), ["watch.drop_dir"], id="drop_dir-holds-every-other-folder"),
    pytest.param(move_archive(rejected_dir="drop/../archive/rejected"), ["archive.rejected_dir", "archive.dir"],
                 id="rejected_dir-via-dotdot-inside-archive.dir"),
    pytest.param(rejected_dir_through_a_link_into_archive, ["archive.rejected_dir", "archive.dir"],
                 id="rejected_dir-through-a-link-inside-archive.dir"),
    # the SQLite file where the scanner would import (or the repair delete) it
    pytest.param(sqlite_at("drop/watcher.db"), ["database.url", "watch.drop_dir"], id="sqlite-file-inside-drop_dir"),
    pytest.param(sqlite_at("drop/deep/er/watcher.db"), ["database.url", "watch.drop_dir"],
                 id="sqlite-file-deep-inside-drop_dir"),
    pytest.param(set_("database", url="sqlite:///drop/watcher.db"), ["database.url", "watch.drop_dir"],
                 id="sqlite-file-relative-inside-drop_dir"),
    pytest.param(sqlite_at("archive/watcher.db"), ["database.url", "archive.dir"], id="sqlite-file-inside-archive.dir"),
    pytest.param(sqlite_at("rejected/watcher.db"), ["database.url", "archive.rejected_dir"],
                 id="sqlite-file-inside-rejected_dir"),
    pytest.param(sqlite_through_a_link_into_drop, ["database.url", "watch.drop_dir"],
                 id="sqlite-file-through-a-link-inside-drop_dir"),
    pytest.param(default_sqlite_with_drop_dir_the_config_folder, ["database.url", "watch.drop_dir"],
                 id="default-sqlite-file-inside-drop_dir"),
    # too short to tell a finished file from one being written
    pytest.param(set_("watch", settle_seconds=0), ["watch.settle_seconds"], id="settle_seconds-0"),
    pytest.param(set_("watch", settle_seconds=MIN_SETTLE_SECONDS / 2), ["watch.settle_seconds"],
                 id="settle_seconds-below-minimum"),
    pytest.param(set_("watch", settle_seconds=-5), ["watch.settle_seconds"], id="settle_seconds-negative"),
    pytest.param(set_("watch", settle_seconds=math.nan), ["watch.settle_seconds"], id="settle_seconds-nan"),
    pytest.param(set_("watch", settle_seconds=True), ["watch.settle_seconds"], id="settle_seconds-true"),
    pytest.param(set_("watch", incomplete_seconds=0), ["watch.incomplete_seconds"], id="incomplete_seconds-0"),
    pytest.param(set_("watch", incomplete_seconds=MIN_INCOMPLETE_SECONDS - 1), ["watch.incomplete_seconds"],
                 id="incomplete_seconds-below-minimum"),
    pytest.param(set_("watch", settle_seconds=120, incomplete_seconds=100), ["watch.incomplete_seconds"],
                 id="incomplete_seconds-below-settle_seconds"),
    pytest.param(set_("watch", incomplete_seconds=math.nan), ["watch.incomplete_seconds"],
                 id="incomplete_seconds-nan"),
    pytest.param(set_("watch", rescan_seconds=math.nan), ["watch.rescan_seconds"], id="rescan_seconds-nan"),
    # typos and omissions
    pytest.param(typo("watch", "settle_second", "settle_seconds"), ["watch.settle_second"], id="typo-settle_second"),
    pytest.param(typo("watch", "dropdir", "drop_dir"), ["watch.dropdir"], id="typo-dropdir"),
    pytest.param(typo("archive", "rejected-dir", "rejected_dir"), ["archive.rejected-dir"], id="typo-rejected-dir"),
    pytest.param(typo("database", "uri", "url"), ["database.uri"], id="typo-database.uri"),
    pytest.param(typo("import", "Workers"), ["import.Workers"], id="typo-capitalised-key"),
    pytest.param(typo("archiv", "dir"), ["[archiv]"], id="typo-section"),
    pytest.param(lambda tmp_path, data: data["watch"].pop("drop_dir"), ["watch.drop_dir"], id="missing-drop_dir"),
    # the web app
    pytest.param(set_("http", port=0), ["http.port"], id="http.port-0"),
    pytest.param(set_("http", port=70000), ["http.port"], id="http.port-too-high"),
    pytest.param(set_("http", port="8080"), ["http.port"], id="http.port-a-string"),
    pytest.param(set_("http", bind="my host"), ["http.bind"], id="http.bind-not-an-address"),
    pytest.param(set_("http", session_hours=0), ["http.session_hours"], id="http.session_hours-0"),
    pytest.param(set_("http", sessions_hours=1), ["http.sessions_hours"], id="typo-http.sessions_hours"),
    pytest.param(lambda tmp_path, data: data.update(http={"port": 11112}, dicom={"port": 11112}),
                 ["http.port", "dicom.port"], id="http.port-is-dicom.port"),
]


def test_the_web_app_is_on_with_an_http_section_with_its_defaults(tmp_path):
    assert from_dict(valid(tmp_path), base=tmp_path).http is None
    data = valid(tmp_path)
    data["http"] = {}
    http = from_dict(data, base=tmp_path).http
    assert (http.bind, http.port, http.session_hours) == ("127.0.0.1", 8080, 12.0)


@pytest.mark.parametrize("change, keys", REFUSED)
def test_risky_config_is_refused_naming_the_key(tmp_path, change, keys):
    data = valid(tmp_path)
    change(tmp_path, data)
    with pytest.raises(ConfigError) as refused:
        from_dict(data, base=tmp_path)
    for key in keys:
        assert key in str(refused.value), f"{key} not named in: {refused.value}"


@pytest.mark.parametrize("change, keys", [p for p in REFUSED if p.id in {
    "rejected_dir-inside-archive.dir", "sqlite-file-inside-drop_dir", "settle_seconds-nan",
    "incomplete_seconds-0", "typo-settle_second"}])
def test_risky_config_file_is_refused_by_load_naming_the_key(tmp_path, change, keys):
    data = valid(tmp_path)
    change(tmp_path, data)
    path = tmp_path / "watcher.toml"
    path.write_text(toml(data))
    with pytest.raises(ConfigError) as refused:
        load(path)
    for key in keys:
        assert key in str(refused.value), f"{key} not named in: {refused.value}"


def test_a_valid_config_at_the_lower_bounds_is_accepted(tmp_path):
    data = valid(tmp_path)
    data["watch"].update(settle_seconds=MIN_SETTLE_SECONDS, incomplete_seconds=MIN_INCOMPLETE_SECONDS)
    data["archive"].update(on_success="move", done_dir="done")
    cfg = from_dict(data, base=tmp_path)
    assert cfg.watch.settle_seconds == MIN_SETTLE_SECONDS
    assert cfg.watch.incomplete_seconds == MIN_INCOMPLETE_SECONDS
    assert cfg.archive.done_dir == tmp_path / "done"


@pytest.mark.parametrize("where", ["drop", "drop/etc", "archive", "rejected"],
                         ids=["in-drop_dir", "deep-in-drop_dir", "in-archive.dir", "in-rejected_dir"])
def test_config_file_inside_one_of_our_folders_is_refused(tmp_path, where):
    key = {"drop": "watch.drop_dir", "archive": "archive.dir", "rejected": "archive.rejected_dir"}[where.split("/")[0]]
    folder = tmp_path / where
    folder.mkdir(parents=True)
    data = valid(tmp_path)
    for section, name in (("watch", "drop_dir"), ("archive", "dir"), ("archive", "rejected_dir")):
        data[section][name] = str(tmp_path / data[section][name])  # absolute: as meant, wherever the file is
    path = folder / "watcher.toml"
    path.write_text(toml(data))
    with pytest.raises(ConfigError) as refused:
        load(path)
    assert key in str(refused.value) and "config file" in str(refused.value), refused.value
    result = cli("scan", "--config", str(path))
    assert result.returncode != 0 and key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- the CLI ----------------------------------------------------------------------------------------

def cli(*args, timeout=30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "watcher", *args], capture_output=True, text=True,
                              timeout=timeout, env={k: v for k, v in os.environ.items() if k != "WATCHER_CONFIG"})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"dicom-watcher {' '.join(args)} still running after {timeout} s (it accepted "
                    f"the config); stderr: {(exc.stderr or b'')[-2000:]!r}")


def config_file(tmp_path: Path, db_url: str, drop_dir: str) -> Path:
    data = valid(tmp_path)
    data["watch"]["drop_dir"] = drop_dir
    data["database"]["url"] = db_url
    path = tmp_path / "watcher.toml"
    path.write_text(toml(data))
    return path


@pytest.mark.parametrize("command", ["run", "scan"])
def test_missing_drop_dir_is_refused_naming_the_key_and_not_created(tmp_path, db_url, command):
    path = config_file(tmp_path, db_url, "missing/drop")
    result = cli(command, "--config", str(path))
    assert result.returncode != 0, result.stdout + result.stderr
    assert "watch.drop_dir" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "missing").exists()


def test_create_drop_dir_makes_scan_create_it_and_succeed(tmp_path, db_url):
    path = config_file(tmp_path, db_url, "missing/drop")
    result = cli("scan", "--create-drop-dir", "--config", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "missing" / "drop").is_dir()
    assert "imported 0" in result.stdout


@pytest.mark.parametrize("kind, create", [("a-file", False), ("a-file", True), ("a-dangling-link", False)],
                         ids=["a-file", "a-file-with-create-drop-dir", "a-dangling-link"])
def test_drop_dir_that_is_not_a_folder_is_refused_naming_the_key(tmp_path, db_url, kind, create):
    drop = tmp_path / "drop"
    if kind == "a-file":
        drop.write_text("not a folder")
    else:
        os.symlink(tmp_path / "nowhere", drop)
    path = config_file(tmp_path, db_url, "drop")
    result = cli("scan", *(["--create-drop-dir"] if create else []), "--config", str(path))
    assert result.returncode != 0, result.stdout + result.stderr
    assert "watch.drop_dir" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", ["run", "scan"])
@pytest.mark.parametrize("change, keys", [p for p in REFUSED if p.id in {
    "rejected_dir-inside-archive.dir", "sqlite-file-inside-drop_dir", "settle_seconds-0",
    "settle_seconds-nan", "incomplete_seconds-0", "typo-settle_second"}])
def test_cli_refuses_a_risky_config_naming_the_key(tmp_path, command, change, keys):
    data = valid(tmp_path)
    (tmp_path / "drop").mkdir(exist_ok=True)
    change(tmp_path, data)
    path = tmp_path / "watcher.toml"
    path.write_text(toml(data))
    result = cli(command, "--config", str(path), timeout=15)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for key in keys:
        assert key in result.stderr, f"{key} not named in: {result.stderr[-2000:]}"
