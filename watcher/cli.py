"""dicom-watcher: thin commands that parse, open, call one function and print."""

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from . import logs, models, ownership, replication_config, report, runlock
from .config import check_drop_dir, from_env_or
from .errors import ConfigError, Refused, Unavailable
from .models import IMPORT
from .studies import databases as study_databases

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="TOML config file (default: $WATCHER_CONFIG).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
database_option = click.option("--database", "database_name", default=IMPORT, show_default=True,
                               help="The study database to look at ('all' for every one).")
create_option = click.option("--create-drop-dir", "create", is_flag=True,
                             help="Create watch.drop_dir if it does not exist (else that is an error).")


@contextlib.contextmanager
def _importing(config, what: str, create: bool):
    """The checks and the lock every command that imports needs; exits with a message."""
    try:
        check_drop_dir(config, create)
        url = config.database.url
        if url.startswith("sqlite:///"):  # (the lock file lies beside the database)
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        lock = runlock.hold(url, config.import_.node, what)
        lock.__enter__()
    except (ConfigError, runlock.AlreadyRunning) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _open(config_path, read_only: bool = False):
    """The config and the database; ``read_only`` for commands that only look: they work for a
    user who may only read the database, never create or migrate it, never wait for a lock."""
    config = _config(config_path)
    _connect(config, read_only)
    return config


def _config(config_path):
    try:
        return from_env_or(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _connect(config, read_only: bool = False) -> None:
    """Open (and, unless ``read_only``, create or migrate) the database. The importing
    commands call it holding the run lock, so a second one is refused by the lock, with
    the holder's name, rather than by a database busy migrating."""
    try:
        models.connect(config.database.url, readonly=read_only)
    except models.NotReady as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"cannot open the database {config.database.url}: {exc}") from None
    if not read_only:  # (a command that may write to the archive: it must be this catalog's)
        try:
            ownership.claim(config.archive.dir, config.database.url)
        except ownership.NotOurs as exc:
            raise click.ClickException(str(exc)) from None


def _print_json(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


class _Progress:
    """``scan`` on a terminal: one line, rewritten at most 5 times a second."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.started = self.shown = time.monotonic()
        self.width = 0

    def __call__(self, done: int, found: int, waiting: str) -> None:
        now = time.monotonic()
        if now - self.shown < 0.2 and not waiting:
            return
        self.shown = now
        rate = done / (now - self.started) if now > self.started else 0.0
        line = f"{done:,} of {found:,} files done ({rate:,.0f}/s)" + (f"; waiting for {waiting}" if waiting else "")
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@click.group()
@click.option("-v", "--verbose", count=True, help="More log lines: -v the pipeline's, -vv also SQL.")
@click.option("-q", "--quiet", count=True, help="Fewer log lines.")
@click.version_option(package_name="dicom-watcher")
def cli(verbose, quiet):
    """Import DICOM files from a drop folder into the Import database."""
    logs.setup(verbose, quiet)


@cli.command()
@config_option
@click.option("--final", is_flag=True,
              help="The folder is at rest: reject incomplete files once settled, "
                   "instead of leaving them pending for incomplete_seconds.")
@create_option
@json_option
def scan(config_path, final, create, as_json):
    """Process everything in the drop folder now, then exit.

    On a terminal it shows its progress and what it waits for. Refused while a
    service (or another scan) imports into the same database. Exits 1 when a file's
    outcome was recorded but it could not be removed or moved (each is named).
    Example: dicom-watcher scan --config etc/watcher.toml --final --json
    """
    from .sweep import sweep
    config = _config(config_path)
    if not config.watches:
        raise click.ClickException(f"{config.path} has no drop folder ([watch] drop_dir): nothing to scan")
    progress = _Progress() if sys.stderr.isatty() else None
    with _importing(config, "scan", create):
        _connect(config)
        try:
            counts = sweep(config, final=final, progress=progress)
        except Unavailable as exc:
            raise click.ClickException(f"stopped, files left in place: {exc}") from None
        finally:
            if progress:
                progress.close()
    stuck = counts.pop("undisposed")
    summary = {k: counts.get(k, 0) for k in ("imported", "duplicate", "dicomdir", "rejected", "conflict",
                                             "pending")}
    summary.update({k: v for k, v in counts.items() if k not in summary}, undisposed=stuck)
    if as_json:
        _print_json(summary)
    else:
        click.echo("imported {imported}, duplicates {duplicate}, dicomdir {dicomdir}, rejected "
                   "{rejected}, pending {pending}".format(**summary))
    if stuck:
        for source, error in sorted(stuck.items()):
            click.echo(f"  left in the drop folder: {source}: {error}", err=True)
        raise click.ClickException(f"{len(stuck)} files could not be removed or moved (listed above)")


@cli.command()
@config_option
@create_option
def run(config_path, create):
    """Run the service: watch the drop folder and import files as they complete.

    Stops cleanly on SIGTERM or SIGINT. A second service on the same database (or the
    same node name on PostgreSQL) is refused. Example: dicom-watcher run --config etc/watcher.toml
    """
    import signal
    import threading

    stop = threading.Event()  # first of all: a SIGTERM during start-up must stop us cleanly too
    # The handler runs in the main thread between two of its steps, possibly inside
    # ``stop.wait()`` while that holds the event's (non-reentrant) lock: setting the event
    # right there would wait for that lock forever. Another thread sets it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=stop.set, daemon=True).start())
    from .service import run as run_service
    from .studies.routine import Routine
    config = _config(config_path)
    with _importing(config, "run", create):
        _connect(config)
        try:
            Routine(config).check()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            run_service(config, stop)
        except ConfigError as exc:  # (found only on starting: a port that is taken)
            raise click.ClickException(str(exc)) from None


def _database_ids(name):
    try:
        return study_databases.ids_of(name)
    except Refused as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@config_option
@json_option
@database_option
@click.option("--check", is_flag=True, help="For monitors: exit 0 only if a service reported "
              "lately and the database and archive are usable; else exit 1 saying why.")
def status(config_path, as_json, database_name, check):
    """Counts, each watcher node's heartbeat, and the files still waiting, by state.

    Example: dicom-watcher status --json; dicom-watcher status --check
    """
    config = _open(config_path, read_only=True)
    if check:
        ok, why = report.health(config)
        click.echo(why)
        sys.exit(0 if ok else 1)
    result = report.status(_database_ids(database_name), config.distribute.stable_seconds)
    result["pending"] = report.pending_counts(report.pending(config))
    result["replications"] = replication_config.states(config)
    if as_json:
        return _print_json(result)
    click.echo(f"{database_name}: " + "patients {patients}  studies {studies}  series {series}  "
               "instances {instances}  rejected {rejected}  last import {last_import}".format(**result))
    for d in result["databases"]:
        click.echo(f"  database {d['name']}: studies {d['studies']}, instances {d['instances']}")
    click.echo(f"stable studies in import waiting for a rule or a data manager: "
               f"{result['stable_in_import']}")
    for n in result["nodes"]:
        state = f"paused ({n['outage']}, since {n['outage_since']})" if n["state"] == "paused" else n["state"]
        click.echo(f"node {n['node']} ({n['host']}, pid {n['pid']}): {state}, last seen "
                   f"{n['seconds_since_seen']} s ago, queue {n['queue_depth']}, "
                   f"in flight {n['in_flight']}, last rescan {n['last_rescan']}")
    if not result["nodes"]:
        click.echo("no watcher service has reported yet")
    waiting = {k: v for k, v in result["pending"].items() if v}
    click.echo("pending: " + (", ".join(f"{k} {v}" for k, v in waiting.items()) or "none")
               + ("  (dicom-watcher pending: which files, and why)" if waiting else ""))
    for r in result["replications"]:
        click.echo(_replication_line(r))


def _replication_line(r: dict) -> str:
    failing = f" ({r['failures']} runs in a row: {r['last_error']})" if r["state"] == "failing" else ""
    return (f"replication from {r['source']} into {r['to']}: {r['state']}{failing}, last complete "
            f"{r['last_ok'] or 'never'}, next attempt {r['next_attempt'] or 'when the service runs'}")


@cli.command()
@config_option
@json_option
def pending(config_path, as_json):
    """Every file in the drop folder without an outcome yet, its state and why.

    States: settling, queued, incomplete, open-for-writing, changing, ignored, claimed,
    retrying, cannot-dispose. A failing scheduled replication is named first (text only).
    Example: dicom-watcher pending --json
    """
    config = _open(config_path, read_only=True)
    rows = report.pending(config)
    if as_json:
        return _print_json(rows)
    for r in replication_config.states(config):  # (what waits on another archive)
        if r["state"] == "failing":
            click.echo(_replication_line(r))
    for r in rows:
        when = f" (next attempt {r['next_attempt']})" if r["next_attempt"] else ""
        click.echo(f"{r['state']:<16} {r['path']}\n    {r['detail']}{when}")
    counts = {k: v for k, v in report.pending_counts(rows).items() if v}
    click.echo(f"{len(rows)} pending" + (": " + ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else ""))


@cli.command("list")
@config_option
@json_option
@database_option
@click.option("--limit", type=int, default=None, help="At most this many instances.")
def list_(config_path, as_json, database_name, limit):
    """The imported instances (a patient/study/series tree, or JSON).

    Example: dicom-watcher list --json --limit 10
    """
    config = _open(config_path, read_only=True)
    rows = report.instances(config.archive.dir, limit, _database_ids(database_name))
    if as_json:
        return _print_json(rows)
    patient = study = series = None
    for r in rows:
        if r["patient_id"] != patient:
            patient = r["patient_id"]
            click.echo(f"Patient {patient or '(no ID)'}  {r['patient_name']}")
        if r["study_instance_uid"] != study:
            study = r["study_instance_uid"]
            click.echo(f"  Study {r['study_date']} {r['study_description']}  [{study}]")
        if r["series_instance_uid"] != series:
            series = r["series_instance_uid"]
            click.echo(f"    Series {r['series_number']} {r['modality']} {r['series_description']}"
                       f"  [{series}]")
        click.echo(f"      #{r['instance_number']}  {r['sop_instance_uid']}  {r['size']} B  "
                   f"from {r['source']}")


@cli.command()
@config_option
@json_option
def rejects(config_path, as_json):
    """Files that were rejected, why, and where they lie now.

    Example: dicom-watcher rejects
    """
    _open(config_path, read_only=True)
    rows = report.rejects()
    if as_json:
        return _print_json(rows)
    for r in rows:
        click.echo(f"{r['rejected_at']}  {r['reason']:<17} {r['source']}\n    {r['detail']}\n"
                   f"    now at {r['path']}")
    click.echo(f"{len(rows)} rejected")


def _since(ctx, param, value):
    try:
        return None if value is None else report.parse_since(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@config_option
@json_option
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many lines (default: all with --json, else the newest 100).")
@click.option("--since", callback=_since, metavar="WHEN",
              help="Only lines since WHEN: 2024-05-01, 2024-05-01T13:30 (UTC unless a zone "
                   "is given), or an age: 30m, 2h, 3d, 1w.")
@click.option("--outcome", "outcomes", multiple=True, type=click.Choice(report.OUTCOMES),
              help="Only lines with this outcome (repeatable).")
def history(config_path, as_json, limit, since, outcomes):
    """What happened to every file, newest first.

    Example: dicom-watcher history --since 2h --outcome rejected
    """
    _open(config_path, read_only=True)
    shown = limit or (None if as_json else 100)
    rows = report.history(shown, since, outcomes)
    if as_json:
        return _print_json(rows)
    for r in rows:
        why = f"  {r['reason']}: {r['detail']}" if r["reason"] else ""
        click.echo(f"{r['at']}  {r['outcome']:<9} {r['source']}  {r['sop_instance_uid'] or ''}{why}")
    more = report.history_count(since, outcomes) - len(rows) if len(rows) == shown else 0
    if more:
        click.echo(f"… {more:,} older events not shown; --limit N or --json for all")
    elif not rows:
        click.echo("no events" + (" match" if since or outcomes else " yet"))


@cli.command()
@config_option
@json_option
@click.option("--repair", is_flag=True,
              help="Remove orphan and temporary files (never one an import in progress will use).")
def verify(config_path, as_json, repair):
    """Re-hash every stored original; report missing, mismatched and orphan files.

    Exits 1 when a row's file is missing or differs. Example: dicom-watcher verify
    """
    config = _open(config_path, read_only=not repair)
    from . import verify as verifying  # (here: a read command need not load what it never runs)
    found = verifying.verify(config.archive.dir)
    removed = verifying.repair(config.archive.dir, found) if repair else []
    if as_json:
        _print_json(dict(found.as_dict(), removed=removed))
    else:
        click.echo(f"checked {found.checked}, missing {len(found.missing)}, mismatched "
                   f"{len(found.mismatched)}, orphans {len(found.orphans)}, temporary "
                   f"{len(found.temporary)}, removed {len(removed)}")
        for kind in ("missing", "mismatched", "orphans", "temporary"):
            for rel in getattr(found, kind):
                click.echo(f"  {kind}: {config.archive.dir / rel}")
    sys.exit(0 if found.ok else 1)


@cli.command()
@config_option
@json_option
@click.argument("sources", nargs=-1)
def retry(config_path, sources, as_json):
    """Put rejected files back into the drop folder (all, or those named by source).

    Example: dicom-watcher retry cdrom/DICOM/IMG0001
    """
    config = _open(config_path)
    from . import retrieve
    try:
        moved = retrieve.retry(config, sources)
    except Refused as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        return _print_json({"put_back": len(moved), "sources": moved})
    for source in moved:
        click.echo(f"back in the drop folder: {source}")
    click.echo(f"{len(moved)} files put back")


@cli.command()
@config_option
@click.argument("uid")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@json_option
@database_option
def export(config_path, uid, dest, as_json, database_name):
    """Copy the originals of an instance, series, study or patient (UID or Patient ID) to DEST.

    Example: dicom-watcher export 1.2.826.0.1.3680043.8.498.1 /tmp/out
    """
    from . import retrieve
    config = _open(config_path, read_only=True)
    try:
        written = retrieve.export(config, uid, dest, _database_ids(database_name))
    except retrieve.ExportError as exc:
        raise click.ClickException(str(exc)) from None
    if not written:
        raise click.ClickException(f"nothing matches {uid!r}")
    if as_json:
        return _print_json({"copied": len(written), "dest": str(dest), "files": [str(p) for p in written]})
    click.echo(f"{len(written)} files copied to {dest}")


@cli.command()
@config_option
@json_option
def discs(config_path, as_json):
    """Each disc copied in (its DICOMDIR): the files it lists, which arrived, which are missing.

    Files still in the drop folder are waiting, not missing.

    Example: dicom-watcher discs --json
    """
    from . import discs as disc_copies  # (pydicom: only this command needs it at start-up)
    config = _open(config_path, read_only=True)
    rows = disc_copies.report(config)
    if as_json:
        _print_json(rows)
        return
    for d in rows:
        state = "complete" if d["complete"] else "INCOMPLETE"
        click.echo(f"{d['source']}  {state}  arrived {d['arrived_at']}  sha256 {d['sha256']}")
        click.echo(f"  referenced {d['referenced']}, arrived {d['arrived']}, waiting {len(d['waiting'])}, "
                   f"missing {len(d['missing'])}")
        for kind in ("waiting", "missing"):
            for path in d[kind]:
                click.echo(f"  {kind}: {path}")
    if not rows:
        click.echo("no discs")


from .cli_studies import databases, distribute  # noqa: E402 (they use the helpers above)
from .cli_users import grant, revoke, users  # noqa: E402
from .cli_replicate import replicate  # noqa: E402

cli.add_command(databases)
cli.add_command(distribute)
cli.add_command(users)
cli.add_command(grant)
cli.add_command(revoke)
cli.add_command(replicate)
