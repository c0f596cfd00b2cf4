"""Accounts and rights: on real databases (SQLite and PostgreSQL) and the real CLI. Who may do
what is decided by watcher/studies/rights.py alone; passwords and secrets are never shown."""

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner
from playhouse.migrations import Runner

from conftest import write_config_file
from watcher import models
from watcher.cli import cli
from watcher.config import load
from watcher.models import Account, ApiToken, Grant, StudyDatabase
from watcher.studies import accounts, rights

README = Path(__file__).resolve().parent.parent / "README.md"
PASSWORD = "correct horse battery"


@pytest.fixture
def site(tmp_path, db_url):
    """A config file, its database, and the CLI: ``site.cli(*args, code=0, input=None)``."""
    path = write_config_file(tmp_path, db_url)
    cfg = load(path)
    models.connect(cfg.database.url)

    def invoke(*args, code=0, input=None):
        result = CliRunner().invoke(cli, [*args, "--config", str(path)], input=input)
        models.connect(cfg.database.url)  # (a read command binds the models read-only)
        assert result.exit_code == code, result.output + repr(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
        return result

    class Site:
        config, cli = cfg, staticmethod(invoke)

        @staticmethod
        def add(name, manager=False, password=PASSWORD):
            invoke("users", "add", name, "--password-stdin", *(["--manager"] if manager else []),
                   input=password + "\n")
            return Account.get(Account.name == name)

        @staticmethod
        def databases(*names):
            for name in names:
                invoke("databases", "create", name)

    yield Site
    models.database.close()


def test_right_password_signs_in_and_a_wrong_or_unknown_one_does_not(site):
    site.add("alice")
    assert accounts.verify_password("alice", PASSWORD).name == "alice"
    assert accounts.verify_password("alice", PASSWORD + "x") is None
    assert accounts.verify_password("alice", "") is None
    assert accounts.verify_password("nobody", PASSWORD) is None
    stored = Account.get(Account.name == "alice").password_hash
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


def test_password_hash_made_with_weaker_parameters_is_rehashed_at_sign_in(site):
    site.add("alice")
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    Account.update(password_hash=weak).where(Account.name == "alice").execute()
    assert accounts.verify_password("alice", PASSWORD) is not None
    rehashed = Account.get(Account.name == "alice").password_hash
    assert rehashed != weak and not PasswordHasher().check_needs_rehash(rehashed)
    assert accounts.verify_password("alice", PASSWORD) is not None


def test_users_add_asks_twice_hidden_until_both_agree(site):
    result = site.cli("users", "add", "alice", input="first-password\nsecond-password\n"
                      "agreed-password\nagreed-password\n")
    assert "added alice" in result.stdout and "do not match" in result.output
    assert all(p not in result.output for p in ("first-password", "second-password", "agreed-password"))
    assert accounts.verify_password("alice", "agreed-password") is not None
    assert accounts.verify_password("alice", "first-password") is None


def test_short_password_and_bad_or_taken_names_are_refused(site):
    site.cli("users", "add", "alice", "--password-stdin", input="short\n", code=1)
    site.cli("users", "add", "Alice Smith", "--password-stdin", input=PASSWORD + "\n", code=1)
    site.add("alice")
    result = site.cli("users", "add", "alice", "--password-stdin", input="another-password\n", code=1)
    assert "exists already" in result.output
    assert accounts.verify_password("alice", PASSWORD) is not None  # unchanged


def test_passwords_and_hashes_are_never_printed_or_logged_even_with_sql_lines(site):
    root = logging.getLogger()
    level = root.level
    try:
        result = site.cli("-vv", "users", "add", "alice", "--password-stdin", input=PASSWORD + "\n")
        token = site.cli("-vv", "users", "token", "alice").stdout.strip()
    finally:
        root.setLevel(level)
    assert 'INSERT INTO "account"' in result.stderr  # the SQL lines are there, without the hash
    secrets = [PASSWORD, Account.get().password_hash, ApiToken.get().token_hash]
    for text in (result.stdout, result.stderr):
        assert "$argon2" not in text and not any(s in text for s in secrets)
    assert token and ApiToken.get().token_hash not in site.cli("users", "list", "--json").stdout


def test_disabled_account_is_refused_at_once_by_password_token_and_rights(site):
    site.databases("trial-a")
    alice = site.add("alice")
    site.cli("grant", "alice", "trial-a", "write")
    token = site.cli("users", "token", "alice").stdout.strip()
    signed_in = accounts.verify_password("alice", PASSWORD)  # held by a session, say
    assert accounts.check_token(token) and rights.may(signed_in, "upload", "trial-a")

    assert "1 tokens revoked" in site.cli("users", "disable", "alice").stdout
    assert accounts.verify_password("alice", PASSWORD) is None
    assert accounts.check_token(token) is None
    for held in (alice, signed_in):  # rows read before the account was disabled
        assert not rights.may(held, "browse", "trial-a")
        assert rights.readable_databases(held) == []
    site.cli("users", "token", "alice", code=1)
    [row] = json.loads(site.cli("users", "list", "--json").stdout)
    assert row["disabled"] is True and row["tokens"] == 0


def test_disabled_manager_loses_every_right(site):
    boss = site.add("boss", manager=True)
    assert rights.may(boss, "manage")
    site.cli("users", "disable", "boss")
    assert not rights.may(boss, "manage") and not rights.may(boss, "browse", "import")
    assert rights.readable_databases(boss) == []


def test_token_is_printed_once_and_only_its_hash_kept(site):
    site.add("alice")
    result = site.cli("users", "token", "alice")
    secret = result.stdout.strip()
    assert re.fullmatch(r"dw_[A-Za-z0-9_-]{43}", secret)
    assert secret not in result.stderr  # the log line names the token by its id, not its secret
    [row] = ApiToken.select()
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert accounts.check_token(secret).name == "alice"
    assert secret not in site.cli("users", "list").output
    assert secret not in site.cli("users", "list", "--json").stdout


def test_revoked_token_is_refused_and_others_still_work(site):
    site.add("alice")
    first, second = accounts.issue_token("alice"), accounts.issue_token("alice")
    assert first != second
    assert accounts.revoke_token(first) is True
    assert accounts.check_token(first) is None
    assert accounts.check_token(second).name == "alice"
    assert accounts.revoke_token(first) is False  # already revoked
    assert accounts.check_token("dw_" + "A" * 43) is None
    assert accounts.check_token("") is None
    assert accounts.check_token(ApiToken.get().token_hash) is None  # the hash is not the secret


def test_users_list_shows_rights_and_no_hashes(site):
    site.databases("trial-a", "trial-b")
    site.add("alice")
    site.add("boss", manager=True)
    site.cli("grant", "alice", "trial-a", "read")
    site.cli("grant", "alice", "trial-b", "write")
    result = site.cli("users", "list", "--json")
    assert "$argon2" not in result.stdout and "hash" not in result.stdout
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["alice"]["grants"] == {"trial-a": "read", "trial-b": "write"}
    assert rows["alice"]["is_manager"] is False and rows["boss"]["is_manager"] is True
    assert set(rows["alice"]) == {"name", "is_manager", "disabled", "created_at", "grants", "tokens"}
    text = site.cli("users", "list").output
    assert "trial-a read" in text and "every database (manager)" in text and "$argon2" not in text


def test_grant_and_revoke_change_rights(site):
    site.databases("trial-a")
    alice = site.add("alice")
    assert not rights.may(alice, "browse", "trial-a")
    assert "alice may now read trial-a" in site.cli("grant", "alice", "trial-a", "read").stdout
    assert rights.may(alice, "browse", "trial-a") and not rights.may(alice, "upload", "trial-a")
    site.cli("grant", "alice", "trial-a", "write")  # replaces: one grant per account and database
    assert rights.may(alice, "upload", "trial-a")
    assert Grant.select().count() == 1
    site.cli("grant", "alice", "trial-a", "read")  # and back down
    assert not rights.may(alice, "upload", "trial-a") and rights.may(alice, "download", "trial-a")
    assert "no longer sees" in site.cli("revoke", "alice", "trial-a").stdout
    assert not rights.may(alice, "browse", "trial-a") and rights.readable_databases(alice) == []
    assert "had no right" in site.cli("revoke", "alice", "trial-a").stdout


def test_unknown_user_database_or_level_is_a_clear_error(site):
    site.databases("trial-a")
    site.add("alice")
    assert "no account named 'carol'" in site.cli("grant", "carol", "trial-a", "read", code=1).output
    assert "no database named 'trial-z'" in site.cli("grant", "alice", "trial-z", "read", code=1).output
    assert "'admin' is not one of" in site.cli("grant", "alice", "trial-a", "admin", code=2).output
    assert "no account named" in site.cli("revoke", "carol", "trial-a", code=1).output
    assert "no database named" in site.cli("revoke", "alice", "trial-z", code=1).output
    assert "no account named" in site.cli("users", "disable", "carol", code=1).output
    assert "no account named" in site.cli("users", "token", "carol", code=1).output
    assert Grant.select().count() == 0


def test_manager_and_the_command_line_see_every_database_import_included(site):
    site.databases("trial-a", "trial-b")
    boss = site.add("boss", manager=True)
    for who in (boss, rights.Administrator("root")):
        assert rights.readable_databases(who) == ["import", "trial-a", "trial-b"]
        for database in ("import", "trial-a", "trial-b"):
            for action in rights.ACTIONS:
                assert rights.may(who, action, database), (action, database)
        assert rights.may(who, "manage")
        assert not rights.may(who, "browse", "trial-z")  # no such database: not even for them
        with pytest.raises(rights.NotVisible):
            rights.require(who, "browse", "trial-z")


def test_researcher_with_read_on_trial_a_sees_only_trial_a(site):
    site.databases("trial-a", "trial-b")
    alice = site.add("alice")
    site.cli("grant", "alice", "trial-a", "read")
    assert rights.readable_databases(alice) == ["trial-a"]
    assert [rights.may(alice, a, "trial-a") for a in ("browse", "download", "distribute-from")] == [True] * 3
    assert [rights.may(alice, a, "trial-a") for a in ("upload", "distribute-into", "manage")] == [False] * 3
    assert not rights.may(alice, "manage")
    for other in ("trial-b", "import"):
        assert not any(rights.may(alice, a, other) for a in rights.ACTIONS)
    assert rights.require(alice, "download", "trial-a").name == "trial-a"
    with pytest.raises(rights.Forbidden):
        rights.require(alice, "upload", "trial-a")
    with pytest.raises(rights.NotVisible) as hidden:  # exists, but not for her
        rights.require(alice, "browse", "trial-b")
    with pytest.raises(rights.NotVisible) as missing:  # does not exist at all
        rights.require(alice, "browse", "trial-z")
    assert str(hidden.value).replace("trial-b", "X") == str(missing.value).replace("trial-z", "X")


def test_write_includes_read(site):
    site.databases("trial-a")
    alice = site.add("alice")
    site.cli("grant", "alice", "trial-a", "write")
    assert all(rights.may(alice, a, "trial-a") for a in
               ("browse", "download", "distribute-from", "upload", "distribute-into"))
    assert not rights.may(alice, "manage", "trial-a")
    assert rights.readable_databases(alice) == ["trial-a"]
    assert rights.level_of(alice, "trial-a") == "write"


def test_unknown_action_is_a_bug_not_a_refusal(site):
    boss = site.add("boss", manager=True)
    with pytest.raises(KeyError):
        rights.may(boss, "delete-everything", "import")


def test_deleting_a_database_drops_its_grants_and_a_new_one_of_that_name_has_none(site):
    site.databases("trial-a", "trial-b")
    alice = site.add("alice")
    site.cli("grant", "alice", "trial-a", "write")
    site.cli("grant", "alice", "trial-b", "read")
    site.cli("databases", "delete", "trial-a")
    assert rights.readable_databases(alice) == ["trial-b"]
    assert [g.study_database.name for g in Grant.select()] == ["trial-b"]
    site.databases("trial-a")
    assert not rights.may(alice, "browse", "trial-a")
    assert json.loads(site.cli("users", "list", "--json").stdout)[0]["grants"] == {"trial-b": "read"}


def test_the_schema_itself_drops_grants_with_their_database(site):
    """Whatever deletes a database row (not only databases.delete), its grants go with it."""
    site.databases("trial-a")
    site.add("alice")
    site.cli("grant", "alice", "trial-a", "read")
    with models.database.atomic():
        models.database.execute_sql('DELETE FROM "study_database" WHERE "name" = \'trial-a\'')
    assert Grant.select().count() == 0


def test_migration_from_0006_keeps_the_data_and_adds_accounts(tmp_path, db_url):
    db = models.connect(db_url, migrate=False)
    with db.atomic():
        Runner(db, str(models.MIGRATIONS)).up(target="0006_origins")
    StudyDatabase.insert(name="trial-a", description="Trial A", created_at=models.utcnow()).execute()
    assert not db.table_exists("account")
    db.close()
    with pytest.raises(models.NotReady, match="0007_accounts"):  # read commands say so
        models.connect(db_url, readonly=True)
    models.database.close()

    models.connect(db_url)  # what the service (or any write command) does at start
    try:
        assert [d.name for d in StudyDatabase.select().order_by(StudyDatabase.id)] == ["import", "trial-a"]
        assert {"account", "api_token", "grant"} <= set(models.database.get_tables())
        accounts.add("alice", PASSWORD)
        rights.grant("alice", "trial-a", "read")
        alice = accounts.verify_password("alice", PASSWORD)
        assert rights.readable_databases(alice) == ["trial-a"]
        models.database.close()
        models.connect(db_url, readonly=True)  # up to date now
    finally:
        models.database.close()


def test_every_account_command_is_documented_with_an_example():
    readme = README.read_text()
    commands = {f"users {name}": command for name, command in cli.commands["users"].commands.items()}
    commands.update({name: cli.commands[name] for name in ("grant", "revoke")})
    assert set(commands) == {"users add", "users list", "users disable", "users token", "grant", "revoke"}
    for name, command in commands.items():
        assert "Example: dicom-watcher " + name in command.help, name
        assert f"`{name} " in readme, f"{name} is not in README.md's command list"
    assert "Example:" in cli.commands["users"].help
