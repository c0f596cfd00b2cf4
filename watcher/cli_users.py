"""The commands of the accounts and their rights: ``users``, ``grant``, ``revoke`` (see
watcher/cli.py). Whoever runs them is the site's OS administrator, who acts as a manager.
Passwords are read hidden or from stdin, never echoed, logged or printed."""

import sys

import click

from .cli import _open, _print_json, config_option, json_option
from .cli_studies import _config_path, _refusing
from .models import Account
from .studies import accounts
from .studies import rights


@click.group()
@config_option
@click.pass_context
def users(ctx, config_path):
    """The accounts of the people who sign in to the web app: add, list, disable, give a token.

    Example: dicom-watcher users add alice; dicom-watcher users list
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt="Repeat the password")


@users.command("add")
@config_option
@click.argument("name")
@click.option("--manager", is_flag=True, help="Every right on every database, and managing "
              "accounts, rights and databases.")
@click.option("--password-stdin", "password_stdin", is_flag=True,
              help="Read the password from the first line of stdin instead of asking twice.")
@click.pass_context
def users_add(ctx, config_path, name, manager, password_stdin):
    """Add an account; its password is asked twice, hidden (or read from stdin).

    Example: dicom-watcher users add alice; dicom-watcher users add bob --manager --password-stdin < bob.pw
    """
    _open(_config_path(ctx, config_path))
    _refusing(accounts.check_name, name)
    if Account.get_or_none(Account.name == name) is not None:  # before asking for a password
        raise click.ClickException(f"an account named {name!r} exists already")
    _refusing(accounts.add, name, _read_password(password_stdin), manager=manager)
    click.echo(f"added {name}" + (" (manager)" if manager else ""))


@users.command("list")
@config_option
@json_option
@click.pass_context
def users_list(ctx, config_path, as_json):
    """Every account: manager or not, disabled or not, its rights and live tokens (no hashes).

    Example: dicom-watcher users list --json
    """
    _open(_config_path(ctx, config_path), read_only=True)
    rows = accounts.listing()
    if as_json:
        return _print_json(rows)
    for a in rows:
        rights_text = ("every database (manager)" if a["is_manager"] else
                       ", ".join(f"{d} {level}" for d, level in a["grants"].items()) or "no database")
        click.echo(f"{a['name']:<20} {'DISABLED  ' if a['disabled'] else ''}{rights_text}  "
                   f"tokens {a['tokens']}  created {a['created_at']}")
    if not rows:
        click.echo("no accounts")


@users.command("disable")
@config_option
@click.argument("name")
@click.pass_context
def users_disable(ctx, config_path, name):
    """Refuse an account from now on (password, tokens and rights); its tokens are revoked.

    Example: dicom-watcher users disable alice
    """
    _open(_config_path(ctx, config_path))
    result = _refusing(accounts.disable, name)
    click.echo(f"disabled {name}; {result['tokens_revoked']} tokens revoked")


@users.command("token")
@config_option
@click.argument("name")
@click.pass_context
def users_token(ctx, config_path, name):
    """Issue an API token for an account and print it, this once (only its hash is kept).

    Example: dicom-watcher users token alice > alice.token
    """
    _open(_config_path(ctx, config_path))
    secret = _refusing(accounts.issue_token, name)
    click.echo(f"API token for {name} (shown this once; store it now):", err=True)
    click.echo(secret)


@click.command()
@config_option
@click.argument("user")
@click.argument("database")
@click.argument("level", type=click.Choice(rights.LEVELS))
def grant(config_path, user, database, level):
    """Give USER the right to read (browse, download, distribute from) or write (also upload
    and distribute into) DATABASE, replacing the right they had there.

    Example: dicom-watcher grant alice trial-a read
    """
    _open(config_path)
    _refusing(rights.grant, user, database, level)
    click.echo(f"{user} may now {level} {database}")


@click.command()
@config_option
@click.argument("user")
@click.argument("database")
def revoke(config_path, user, database):
    """Take away USER's right on DATABASE: they no longer see it.

    Example: dicom-watcher revoke alice trial-a
    """
    _open(config_path)
    result = _refusing(rights.revoke, user, database)
    click.echo(f"{user} no longer sees {database}" if result["revoked"] else
               f"{user} had no right on {database}")
