"""The command that pulls studies from another archive: ``replicate`` (see watcher/cli.py).

watcher/replicate.py (urllib3, the ingest path) is imported when the command runs, not when
the CLI starts."""

import click

from .cli import _open, _print_json, config_option, json_option
from .errors import Refused
from .models import IMPORT


def _date(ctx, param, value):
    from .replicate import since_date
    if value is None:
        return ""
    try:
        return since_date(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@config_option
@click.option("--from", "url", required=True, metavar="URL",
              help="The source's DICOMweb root, e.g. http://pacs:8042/dicom-web/ (Orthanc) or "
                   "https://host/dicom-web/<database>/ (another dicom-watcher).")
@click.option("--token", envvar="WATCHER_REPLICATE_TOKEN", metavar="T",
              help="Sent as 'Authorization: Bearer T' (default: $WATCHER_REPLICATE_TOKEN).")
@click.option("--study", "studies", multiple=True, metavar="UID",
              help="Only this study (Study Instance UID); repeat for more. Default: every study.")
@click.option("--since", callback=_date, metavar="DATE",
              help="Only studies with a study date from DATE (YYYY-MM-DD) on.")
@click.option("--to", "target", default=IMPORT, show_default=True, metavar="NAME",
              help="The study database to move the replicated studies into.")
@json_option
def replicate(config_path, url, token, studies, since, target, as_json):
    """Copy studies from another archive over DICOMweb (QIDO-RS, WADO-RS), byte for byte,
    into the Import database (then into --to). Each original is recorded with origin
    "replication", the source URL and the OS user. Instances already here are not fetched:
    running it again after an interruption fetches only what is missing.

    Exits 1 if any study is incomplete (an instance failed, or the study could not be listed).

    Example: dicom-watcher replicate --from http://pacs:8042/dicom-web/ --since 2026-01-01 --to trial-a
    """
    from .outcome import is_unavailable
    from .replicate import SourceError, os_user, replicate as replicating
    config = _open(config_path)
    try:
        reports = replicating(config, url, token, studies, since, target, actor=os_user())
    except (SourceError, Refused) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        raise click.ClickException(f"stopped, the archive or the database is unavailable: {exc}; "
                                   "run it again once that is fixed (what is stored stays)") from None
    if as_json:
        _print_json([r.as_dict() for r in reports])
    else:
        for r in reports:
            click.echo(f"{r.study_instance_uid}: listed {r.listed}, stored {r.stored}, already "
                       f"present {r.present}, failed {r.failed}"
                       + (f", {r.unidentified} parts that named no instance (the log says why)"
                          if r.unidentified else "")
                       + ("" if r.complete else "  INCOMPLETE"))
            for error in r.errors[:10]:
                click.echo(f"  {error}")
            if len(r.errors) > 10:
                click.echo(f"  … and {len(r.errors) - 10} more")
        click.echo(f"{len(reports)} studies from {url}: stored {sum(r.stored for r in reports)}, "
                   f"already present {sum(r.present for r in reports)}, failed "
                   f"{sum(r.failed for r in reports)}")
    if not all(r.complete for r in reports):
        raise SystemExit(1)
