"""The one configuration file: a TOML file, checked strictly.

Relative paths are taken relative to the folder that holds the config file,
so `etc/watcher.toml` can say `drop_dir = "../var/drop"`.
"""

import ipaddress
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import replication_config
from .errors import ConfigError
from .studies import rules

DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.partial", "*.crdownload", "~*",
                  "Thumbs.db", "desktop.ini", "__MACOSX")


@dataclass(frozen=True)
class Watch:
    drop_dir: Path | None = None  # None: no [watch] section, no drop folder (a receiver only)
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
class Distribute:
    stable_seconds: float = 60.0  # a study with no new instance for this long is given to the rules
    rules: tuple = ()  # watcher.studies.rules.Rule, in order


@dataclass(frozen=True)
class Dicom:
    """The DICOM network receiver (watcher/receive.py): on when the section is there."""
    ae_title: str = "DICOM-WATCHER"
    port: int = 11112
    bind: str = ""  # all interfaces
    creator: str = "dicom-server"
    max_associations: int = 20
    timeout_seconds: float = 60.0  # a sender silent this long is dropped
    calling_ae_titles: tuple = ()  # empty: any caller
    allowed_hosts: tuple = ()  # addresses or CIDR ranges; empty: any
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # given: clients must present a certificate it signed


@dataclass(frozen=True)
class Http:
    """The web app and API (watcher/web/): on when the section is there."""
    bind: str = "127.0.0.1"  # this machine only; put a TLS proxy in front to serve others
    port: int = 8080
    session_hours: float = 12.0  # a sign-in lasts this long (signing out ends it at once)


@dataclass(frozen=True)
class Config:
    watch: Watch
    archive: Archive
    database: Database
    import_: Import
    path: Path | None = None
    distribute: Distribute = Distribute()
    dicom: Dicom | None = None  # the receiver is off without a [dicom] section
    http: Http | None = None  # the web app is off without an [http] section
    replication: tuple = ()  # replication_config.Replication, one per [[replication]] table

    @property
    def watches(self) -> bool:
        """Whether this config has a drop folder ([watch]): a site may run only the receiver,
        the web app (uploads) or replications."""
        return self.watch.drop_dir is not None


SECTIONS = {"watch": Watch, "archive": Archive, "database": Database, "import": Import,
            "distribute": Distribute, "dicom": Dicom, "http": Http}
PATH_KEYS = {"drop_dir", "dir", "rejected_dir", "done_dir"}
FILE_KEYS = {"tls_cert", "tls_key", "tls_ca"}
REQUIRED = {"watch": {"drop_dir"}, "archive": {"dir", "rejected_dir"}}


def load(path: str | os.PathLike) -> Config:
    path = Path(path).resolve()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; name the TOML file in it") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(_text(raw, path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return from_dict(data, base=path.parent, path=path)


def _text(raw: bytes, path: Path) -> str:
    """TOML is UTF-8 (a leading byte-order mark, as some editors write, is allowed)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ConfigError(f"config file {path} is UTF-16, not UTF-8: save it as UTF-8")
    if b"\x00" in raw:
        raise ConfigError(f"config file {path} is not UTF-8 text (it has NUL bytes: UTF-16 "
                          "without a byte-order mark?): save it as UTF-8")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (line {line}): save it as "
                          "UTF-8") from None


def from_dict(data: dict, base: Path, path: Path | None = None) -> Config:
    data = dict(data)
    replication = replication_config.parse(data.pop("replication", []))
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}]; known: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        if not isinstance(data.get(name, {}), dict):
            raise ConfigError(f"{name} must be a section ([{name}]), not a value")
        if name == "watch" and name not in data:
            sections[name] = Watch()  # no drop folder
            continue
        sections[name] = _section(name, cls, dict(data.get(name, {})), base)
    config = Config(sections["watch"], sections["archive"], sections["database"],
                    sections["import"], path, sections["distribute"],
                    sections["dicom"] if "dicom" in data else None,
                    sections["http"] if "http" in data else None, replication)
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
    if f.name in FILE_KEYS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a file path (a non-empty string)")
        path = (base / Path(value).expanduser()).resolve()
        if not path.is_file():
            raise ConfigError(f"{key}: no file at {path}")
        return path
    if f.name in ("calling_ae_titles", "allowed_hosts"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{key} must be a list of non-empty strings")
        if f.name == "allowed_hosts":
            for v in value:
                try:
                    ipaddress.ip_network(v.strip(), strict=False)
                except ValueError:
                    raise ConfigError(f"{key}: {v!r} is not an address or CIDR range") from None
        return tuple(v.strip() for v in value)
    if f.name == "rules":
        return rules.parse(value, key)
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
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, not {value!r}")
    return value


# Below these, files still being written are taken for finished ones: a copy that pauses
# between two writes (settle), a writer that stalls mid-file (incomplete).
MIN_SETTLE_SECONDS = 1.0
MIN_INCOMPLETE_SECONDS = 60.0
# A stalled DICOM sender keeps one of dicom.max_associations until this runs out: not forever,
# and not so short that a sender on a slow link is cut off between two PDUs.
MIN_DICOM_TIMEOUT, MAX_DICOM_TIMEOUT = 1.0, 3600.0


def _check(config: Config) -> None:
    w, a, i = config.watch, config.archive, config.import_
    if w.settle_seconds < MIN_SETTLE_SECONDS:
        raise ConfigError(f"watch.settle_seconds must be at least {MIN_SETTLE_SECONDS:g}: a copy "
                          "that pauses between two writes would be taken for a finished file")
    if w.incomplete_seconds < max(MIN_INCOMPLETE_SECONDS, w.settle_seconds):
        raise ConfigError(f"watch.incomplete_seconds must be at least {MIN_INCOMPLETE_SECONDS:g} "
                          "(and at least watch.settle_seconds): a writer that stalls would have "
                          "its file rejected as truncated")
    if not (config.watches or config.dicom or config.http or config.replication):
        raise ConfigError("nothing to do: give a drop folder ([watch] drop_dir), a DICOM receiver "
                          "([dicom]), the web app ([http]) or a [[replication]]")
    if config.dicom is not None:
        _check_dicom(config.dicom)
    if config.http is not None:
        _check_http(config.http, config.dicom)
    if config.distribute.stable_seconds <= 0:
        raise ConfigError("distribute.stable_seconds must be positive")
    if w.rescan_seconds <= 0:
        raise ConfigError("watch.rescan_seconds must be positive")
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
    _check_folders(config)


def _check_dicom(d: Dicom) -> None:
    if not 0 < len(d.ae_title.strip()) <= 16 or not d.ae_title.isascii() or "\\" in d.ae_title:
        raise ConfigError("dicom.ae_title must be 1 to 16 ASCII characters (no backslash)")
    if not 0 < d.port < 65536:
        raise ConfigError("dicom.port must be between 1 and 65535")
    if not 1 <= d.max_associations <= 1000:
        raise ConfigError("dicom.max_associations must be between 1 and 1000")
    if not MIN_DICOM_TIMEOUT <= d.timeout_seconds <= MAX_DICOM_TIMEOUT:
        raise ConfigError(f"dicom.timeout_seconds must be between {MIN_DICOM_TIMEOUT:g} and "
                          f"{MAX_DICOM_TIMEOUT:g}: a sender that stalls holds an association "
                          "(and its partial object) this long")
    if (d.tls_cert is None) != (d.tls_key is None):
        raise ConfigError("dicom.tls_cert and dicom.tls_key go together")
    if d.tls_ca is not None and d.tls_cert is None:
        raise ConfigError("dicom.tls_ca (client certificates) needs dicom.tls_cert and tls_key")
    if not d.creator:
        raise ConfigError("dicom.creator must not be empty")


def _check_http(h: Http, dicom: Dicom | None) -> None:
    if not 0 < h.port < 65536:
        raise ConfigError("http.port must be between 1 and 65535")
    if not h.bind.strip():
        raise ConfigError('http.bind must name an address ("127.0.0.1", "::1", "0.0.0.0")')
    try:
        ipaddress.ip_address(h.bind)
    except ValueError:
        if h.bind != "localhost":
            raise ConfigError(f"http.bind: {h.bind!r} is not an address") from None
    if dicom is not None and dicom.port == h.port:
        raise ConfigError(f"http.port and dicom.port are both {h.port}: give each its own")
    if not 0 < h.session_hours <= 24 * 30:
        raise ConfigError("http.session_hours must be more than 0 and at most 720 (30 days)")


def _overlap(p: Path, q: Path) -> bool:
    return p == q or q in p.parents or p in q.parents


def _check_folders(config: Config) -> None:
    """Folders that would make the service import, delete or hide its own data are refused.

    The drop folder is emptied by the scanner; ``verify --repair`` deletes what in the
    archive no row references; so none of our folders, and neither the SQLite file nor
    this config file, may lie inside another one's reach.
    """
    w, a = config.watch, config.archive
    folders = [("watch.drop_dir", w.drop_dir)] if w.drop_dir is not None else []
    folders += [("archive.dir", a.dir), ("archive.rejected_dir", a.rejected_dir)]
    if a.done_dir is not None:
        folders.append(("archive.done_dir", a.done_dir))
    for n, (key, path) in enumerate(folders):
        for other_key, other in folders[n + 1:]:
            if _overlap(path, other):
                raise ConfigError(f"{other_key} ({other}) and {key} ({path}) must be separate "
                                  "folders, neither inside the other")
    files = [("the config file", config.path)]
    url = config.database.url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        files.append(("the SQLite file of database.url", Path(url[len("sqlite:///"):]).resolve()))
    for what, path in files:
        if path is None:
            continue
        for key, folder in folders:
            if folder in path.parents:
                raise ConfigError(f"{what} ({path}) must not lie inside {key} ({folder})")


def check_drop_dir(config: Config, create: bool = False) -> None:
    """The drop folder must exist: a misspelt path would be watched while the real folder fills
    up. Creating it is something a person asks for (``--create-drop-dir``). Without [watch]
    there is no drop folder to check."""
    drop = config.watch.drop_dir
    if drop is None:
        return
    where = f" (set in {config.path})" if config.path else ""
    if create:
        try:
            drop.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"watch.drop_dir {drop}{where} cannot be created: {exc.strerror}") from None
    if not drop.is_dir():
        raise ConfigError(f"watch.drop_dir {drop} does not exist{where}; check the path, or "
                          "create it (mkdir, or pass --create-drop-dir)")


def from_env_or(path: str | None) -> Config:
    """The config named by ``--config``, else by $WATCHER_CONFIG."""
    path = path or os.environ.get("WATCHER_CONFIG")
    if not path:
        raise ConfigError("no config: pass --config PATH or set WATCHER_CONFIG")
    return load(path)
