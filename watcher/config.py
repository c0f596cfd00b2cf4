"""The one configuration file: a TOML file, checked strictly.

Relative paths are taken relative to the folder that holds the config file,
so `etc/watcher.toml` can say `drop_dir = "../var/drop"`.
"""

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError

DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.partial", "*.crdownload", "~*",
                  "Thumbs.db", "desktop.ini", "__MACOSX")


@dataclass(frozen=True)
class Watch:
    drop_dir: Path
    settle_seconds: float = 2.0
    incomplete_seconds: float = 300.0
    rescan_seconds: float = 30.0
    poll: bool = False
    ignore: tuple = DEFAULT_IGNORE


@dataclass(frozen=True)
class Archive:
    dir: Path
    rejected_dir: Path
    on_success: str = "delete"
    done_dir: Path | None = None


@dataclass(frozen=True)
class Database:
    url: str


@dataclass(frozen=True)
class Import:
    creator: str = "folder-scanner"
    processes: int = 0  # importer processes; 0: one per CPU core
    workers: int = 2
    node: str = field(default_factory=socket.gethostname)
    attempts: int = 3
    claim_seconds: float = 60.0


@dataclass(frozen=True)
class Config:
    watch: Watch
    archive: Archive
    database: Database
    import_: Import
    path: Path | None = None


SECTIONS = {"watch": Watch, "archive": Archive, "database": Database, "import": Import}
PATH_KEYS = {"drop_dir", "dir", "rejected_dir", "done_dir"}
REQUIRED = {"watch": {"drop_dir"}, "archive": {"dir", "rejected_dir"}}


def load(path: str | os.PathLike) -> Config:
    path = Path(path).resolve()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return from_dict(data, base=path.parent, path=path)


def from_dict(data: dict, base: Path, path: Path | None = None) -> Config:
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}]; known: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = _section(name, cls, dict(data.get(name, {})), base)
    config = Config(sections["watch"], sections["archive"], sections["database"],
                    sections["import"], path)
    _check(config)
    return config


def _section(name, cls, values, base):
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key}; known: {', '.join(known)}")
    for key in REQUIRED.get(name, ()):
        if key not in values:
            raise ConfigError(f"missing key {name}.{key}")
    if name == "database" and "url" not in values:
        values["url"] = "sqlite:///" + str(base / "watcher.db")
    for key, value in values.items():
        values[key] = _convert(f"{name}.{key}", known[key], value, base)
    return cls(**values)


def _convert(key, f, value, base):
    if f.name in PATH_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a folder path (a non-empty string)")
        return (base / Path(value).expanduser()).resolve()
    if f.name == "ignore":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of glob patterns (strings)")
        return tuple(value)
    if f.name == "url" and isinstance(value, str) and value.startswith("sqlite:///"):
        file = value[len("sqlite:///"):]
        return value if file.startswith("/") or file == ":memory:" else "sqlite:///" + str(base / file)
    expected = {"float": (int, float), "bool": bool, "int": int, "str": str}[
        f.type if isinstance(f.type, str) else f.type.__name__]
    if not isinstance(value, expected) or (expected != bool and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {f.type}, not {value!r}")
    return value


def _check(config: Config) -> None:
    w, a, i = config.watch, config.archive, config.import_
    for key, value in (("watch.settle_seconds", w.settle_seconds),
                       ("watch.incomplete_seconds", w.incomplete_seconds),
                       ("watch.rescan_seconds", w.rescan_seconds)):
        if value < 0:
            raise ConfigError(f"{key} must not be negative")
    if w.incomplete_seconds < w.settle_seconds:
        raise ConfigError("watch.incomplete_seconds must be at least watch.settle_seconds")
    if a.on_success not in ("delete", "move"):
        raise ConfigError('archive.on_success must be "delete" or "move"')
    if a.on_success == "move" and a.done_dir is None:
        raise ConfigError('archive.on_success = "move" needs archive.done_dir')
    if not 0 <= i.processes <= 64:
        raise ConfigError("import.processes must be between 0 (one per CPU core) and 64")
    if not 1 <= i.workers <= 64:
        raise ConfigError("import.workers must be between 1 and 64")

    if i.claim_seconds <= 0:
        raise ConfigError("import.claim_seconds must be positive")
    if i.attempts < 1:
        raise ConfigError("import.attempts must be at least 1")
    if not i.creator or not i.node:
        raise ConfigError("import.creator and import.node must not be empty")
    scheme = config.database.url.split(":", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres", "psycopg3"):
        raise ConfigError(f"database.url scheme {scheme!r}: use sqlite:/// or postgresql://")
    inside = [(n, p) for n, p in (("archive.dir", a.dir), ("archive.rejected_dir", a.rejected_dir),
                                  ("archive.done_dir", a.done_dir)) if p is not None
              and (p == w.drop_dir or w.drop_dir in p.parents or p in w.drop_dir.parents)]
    if inside:
        raise ConfigError(f"{inside[0][0]} must lie outside watch.drop_dir (and not contain it)")


def from_env_or(path: str | None) -> Config:
    """The config named by ``--config``, else by $WATCHER_CONFIG."""
    path = path or os.environ.get("WATCHER_CONFIG")
    if not path:
        raise ConfigError("no config: pass --config PATH or set WATCHER_CONFIG")
    return load(path)
