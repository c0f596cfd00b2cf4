"""dicom-watcher: thin commands that parse, open, call one function and print."""

import contextlib
import json
import logging
import sys
from pathlib import Path

import click

from . import models, report, retrieve, runlock
from . import verify as verifying
from .config import check_drop_dir, from_env_or
from .errors import ConfigError, Unavailable

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="TOML config file (default: $WATCHER_CONFIG).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
create_option = click.option("--create-drop-dir", "create", is_flag=True,
                             help="Create watch.drop_dir if it does not exist (else that is an error).")


@contextlib.contextmanager
def _importing(config, what: str, create: bool):
    """The checks and the lock every command that imports needs; exits with a message."""
    try:
        check_drop_dir(config, create)
        lock = runlock.hold(config.database.url, config.import_.node, what)
        lock.__enter__()
    except (ConfigError, runlock.AlreadyRunning) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _open(config_path):
    try:
        config = from_env_or(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        models.connect(config.database.url)
    except Exception as exc:
        raise click.ClickException(f"cannot open the database {config.database.url}: {exc}") from None
    return config


def _print_json(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(max(level, logging.WARNING))


@click.group()
@click.option("-v", "--verbose", count=True, help="More log lines (repeat for more).")
@click.option("-q", "--quiet", count=True, help="Fewer log lines.")
@click.version_option(package_name="dicom-watcher")
def cli(verbose, quiet):
    """Import DICOM files from a drop folder into the Import database."""
    _setup_logging(verbose, quiet)


@cli.command()
@config_option
@click.option("--final", is_flag=True,
              help="The folder is at rest: reject incomplete files once settled, "
                   "instead of leaving them pending for incomplete_seconds.")
@create_option
def scan(config_path, final, create):
    """Process everything in the drop folder now, then exit.

    Refused while a service (or another scan) imports into the same database.
    Exits 1 when a file's outcome was recorded but it could not be removed or moved
    (each is named). Example: dicom-watcher scan --config etc/watcher.toml
    """
    from .sweep import sweep
    config = _open(config_path)
    with _importing(config, "scan", create):
        try:
            counts = sweep(config, final=final)
        except Unavailable as exc:
            raise click.ClickException(f"stopped, files left in place: {exc}") from None
    click.echo("imported {imported}, duplicates {duplicate}, dicomdir {dicomdir}, rejected "
               "{rejected}, pending {pending}".format(**{k: counts.get(k, 0) for k in (
                   "imported", "duplicate", "dicomdir", "rejected", "pending")}))
    stuck = counts["undisposed"]
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
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from .service import run as run_service
    config = _open(config_path)
    with _importing(config, "run", create):
        run_service(config, stop)


@cli.command()
@config_option
@json_option
def status(config_path, as_json):
    """Counts, and each watcher node's heartbeat.

    Example: dicom-watcher status --json
    """
    _open(config_path)
    result = report.status()
    if as_json:
        return _print_json(result)
    click.echo("patients {patients}  studies {studies}  series {series}  instances {instances}  "
               "rejected {rejected}  last import {last_import}".format(**result))
    for n in result["nodes"]:
        click.echo(f"node {n['node']} ({n['host']}, pid {n['pid']}): {n['state']}, last seen "
                   f"{n['seconds_since_seen']} s ago, queue {n['queue_depth']}, "
                   f"in flight {n['in_flight']}, last rescan {n['last_rescan']}")
    if not result["nodes"]:
        click.echo("no watcher service has reported yet")


@cli.command("list")
@config_option
@json_option
@click.option("--limit", type=int, default=None, help="At most this many instances.")
def list_(config_path, as_json, limit):
    """The imported instances (a patient/study/series tree, or JSON).

    Example: dicom-watcher list --json --limit 10
    """
    config = _open(config_path)
    rows = report.instances(config.archive.dir, limit)
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
    _open(config_path)
    rows = report.rejects()
    if as_json:
        return _print_json(rows)
    for r in rows:
        click.echo(f"{r['rejected_at']}  {r['reason']:<17} {r['source']}\n    {r['detail']}\n"
                   f"    now at {r['path']}")
    click.echo(f"{len(rows)} rejected")


@cli.command()
@config_option
@json_option
@click.option("--limit", type=int, default=100, show_default=True)
def history(config_path, as_json, limit):
    """What happened to every file, newest first.

    Example: dicom-watcher history --limit 20
    """
    _open(config_path)
    rows = report.history(limit)
    if as_json:
        return _print_json(rows)
    for r in rows:
        why = f"  {r['reason']}: {r['detail']}" if r["reason"] else ""
        click.echo(f"{r['at']}  {r['outcome']:<9} {r['source']}  {r['sop_instance_uid'] or ''}{why}")


@cli.command()
@config_option
@json_option
@click.option("--repair", is_flag=True,
              help="Remove orphan and temporary files (never one an import in progress will use).")
def verify(config_path, as_json, repair):
    """Re-hash every stored original; report missing, mismatched and orphan files.

    Exits 1 when a row's file is missing or differs. Example: dicom-watcher verify
    """
    config = _open(config_path)
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
@click.argument("sources", nargs=-1)
def retry(config_path, sources):
    """Put rejected files back into the drop folder (all, or those named by source).

    Example: dicom-watcher retry cdrom/DICOM/IMG0001
    """
    config = _open(config_path)
    moved = retrieve.retry(config, sources)
    for source in moved:
        click.echo(f"back in the drop folder: {source}")
    click.echo(f"{len(moved)} files put back")


@cli.command()
@config_option
@click.argument("uid")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def export(config_path, uid, dest):
    """Copy the originals of an instance, series, study or patient (UID or Patient ID) to DEST.

    Example: dicom-watcher export 1.2.826.0.1.3680043.8.498.1 /tmp/out
    """
    config = _open(config_path)
    try:
        written = retrieve.export(config, uid, dest)
    except retrieve.ExportError as exc:
        raise click.ClickException(str(exc)) from None
    if not written:
        raise click.ClickException(f"nothing matches {uid!r}")
    click.echo(f"{len(written)} files copied to {dest}")
