"""The commands of the study databases: ``databases`` and ``distribute`` (see watcher/cli.py)."""

import getpass
import os

import click

from .cli import _open, _print_json, config_option, json_option
from .errors import ConfigError, Refused
from .models import IMPORT
from .studies import databases as dbs
from .studies import distribute as distributing
from .studies import routine


def os_user() -> str:
    """Who runs a command: the CLI acts as the site's administrator, known by the OS user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _refusing(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except (Refused, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group(invoke_without_command=True)
@config_option
@json_option
@click.pass_context
def databases(ctx, config_path, as_json):
    """The study databases and their counts; create, rename and delete them.

    Example: dicom-watcher databases; dicom-watcher databases create trial-a --description "Trial A"
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    if ctx.invoked_subcommand is not None:
        return
    _open(config_path, read_only=True)
    rows = dbs.listing()
    if as_json:
        return _print_json(rows)
    for r in rows:
        click.echo(f"{r['name']:<20} patients {r['patients']}  studies {r['studies']}  series "
                   f"{r['series']}  instances {r['instances']}"
                   + (f"  — {r['description']}" if r["description"] else ""))


def _config_path(ctx, config_path):
    return config_path or ctx.obj.get("config_path")


@databases.command("create")
@config_option
@click.argument("name")
@click.option("--description", default="", help="What the database is for.")
@click.pass_context
def databases_create(ctx, config_path, name, description):
    """Add a study database. Example: dicom-watcher databases create trial-a"""
    _open(_config_path(ctx, config_path))
    _refusing(dbs.create, name, description)
    click.echo(f"created {name}")


@databases.command("rename")
@config_option
@click.argument("old")
@click.argument("new")
@click.pass_context
def databases_rename(ctx, config_path, old, new):
    """Rename a study database (not import). Example: dicom-watcher databases rename trial-a trial-b"""
    _open(_config_path(ctx, config_path))
    _refusing(dbs.rename, old, new)
    click.echo(f"renamed {old} to {new}")


@databases.command("delete")
@config_option
@click.argument("name")
@click.pass_context
def databases_delete(ctx, config_path, name):
    """Delete an empty study database. Example: dicom-watcher databases delete trial-a"""
    _open(_config_path(ctx, config_path))
    _refusing(dbs.delete, name)
    click.echo(f"deleted {name}")


@click.command()
@config_option
@click.argument("keys", nargs=-1)
@click.option("--to", "target", help="The study database to move them into.")
@click.option("--from", "source", default=IMPORT, show_default=True,
              help="The database they are in.")
@click.option("--series", "by_series", is_flag=True, help="KEYS are Series Instance UIDs.")
@click.option("--patient", "by_patient", is_flag=True, help="KEYS are Patient IDs.")
@click.option("--copy", is_flag=True, help="Keep them in the source database as well.")
@click.option("--rules", "by_rules", is_flag=True,
              help="With --dry-run: which rule would take each study now in import, and why.")
@click.option("--dry-run", is_flag=True, help="Print what would move; move nothing.")
@json_option
def distribute(config_path, keys, target, source, by_series, by_patient, copy, by_rules, dry_run,
               as_json):
    """Move studies (Study Instance UIDs) from the Import database (or --from) into a study
    database. The originals are not copied or changed; each instance records who moved it.

    Running the same command again after a crash moves what is left, exactly once.

    Example: dicom-watcher distribute 1.2.3.4 1.2.3.5 --to trial-a
    """
    config = _open(config_path, read_only=dry_run)
    if by_rules:
        if not dry_run or keys or target:
            raise click.ClickException("--rules goes with --dry-run alone (the service applies "
                                       "the rules to stable studies)")
        rows = _refusing(routine.dry_run, config)
        if as_json:
            return _print_json(rows)
        for r in rows:
            click.echo(f"{r['study_instance_uid']}  ->  {r['to'] or '(stays in import)'}  ({r['why']})")
        click.echo(f"{len(rows)} studies in import")
        return
    if by_series and by_patient:
        raise click.ClickException("--series and --patient cannot be combined")
    if not target:
        raise click.ClickException("name the target database with --to")
    kind = "series" if by_series else "patient" if by_patient else "study"
    summary = _refusing(distributing.distribute, keys, target, source=source, kind=kind, copy=copy,
                        dry_run=dry_run, actor=os_user())
    if as_json:
        return _print_json(summary)
    verb = "would " + ("copy" if copy else "move") if dry_run else ("copied" if copy else "moved")
    for s in summary["studies"]:
        if dry_run:
            click.echo(f"{s['study_instance_uid']}: {verb} {s['instances']} instances")
        else:
            click.echo(f"{s['study_instance_uid']}: {verb} {s['moved']}, already there "
                       f"{s['present']}, conflicts {s['conflicts']}")
    for key in summary["already_there"]:
        click.echo(f"{key}: already in {target}")
    if not dry_run:
        click.echo(f"{len(summary['studies'])} studies {verb} from {source} to {target}: "
                   f"{summary['moved']} instances, {summary['present']} already there, "
                   f"{summary['conflicts']} conflicts")
        if summary["conflicts"]:
            raise SystemExit(3)  # done, but not all of it: a person has to decide
