"""A crash at any step loses nothing and duplicates nothing: the next scan completes the work.

Each test runs a real scan in a subprocess that SIGKILLs itself at one chosen
step, then runs a normal scan and checks every dropped file is accounted for
exactly once, byte for byte.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_config_file
from dicomfiles import ct, write
from watcher.cli import cli

# The subprocess patches one function so that the process kills itself with
# SIGKILL when it gets there: a real crash, at a known instant.
CRASHER = textwrap.dedent("""
    import os, signal, sys
    import watcher.{module} as target
    owner, _, name = "{function}".rpartition(".")
    owner = getattr(target, owner) if owner else target
    original = getattr(owner, name)
    def crash(*args, **kwargs):
        if {after}:
            original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(owner, name, crash)
    from watcher.cli import cli
    cli(["scan", "--final", "--config", sys.argv[1]])
""")

# Files with one name are taken whole (captured, then their inode linked into the archive);
# "linked" files have a second name elsewhere, so they are copied; "other" files belong to
# another user (these tests run as root, which may take a lease on them too).
STEPS = {
    "taken out of sight, before the archive links it": ("archive", "_link_inode", False, "ours"),
    "another user's file taken, linked, before its rename": ("archive", "_link_inode", True, "other"),
    "linked into the archive, before its rename into place": ("archive", "_place", False, "ours"),
    "taken and placed, before the folder fsync": ("archive", "fsync_dir", False, "ours"),
    "taken whole and stored, before commit": ("catalog", "record_instances", False, "ours"),
    "committed, before the taken source is removed": ("dispose", "Capture.remove", False, "ours"),
    "original copied to a temporary file, before its rename": ("archive", "_write_temp", True, "linked"),
    "copied and renamed, before the folder fsync": ("archive", "fsync_dir", False, "linked"),
    "copied, stored, before commit": ("catalog", "record_instances", False, "linked"),
    "committed, before the copied source is removed": ("dispose", "remove", False, "linked"),
    "source captured under a private name, before its unlink": ("dispose", "_same", True, "linked"),
    "source removed, before anything else": ("dispose", "remove", True, "linked"),
    "rejection recorded, before the move": ("catalog", "record_rejection", True, "ours"),
}
NOBODY = 65534


def crash_at(config_path, module, function, after, owner):
    code = CRASHER.format(module=module, function=function, after=after)
    proc = subprocess.run([sys.executable, "-c", code, str(config_path)], capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def run_cli(config_path, *args):
    result = CliRunner().invoke(cli, [args[0], "--config", str(config_path), *args[1:]])
    return result


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_step_loses_and_duplicates_nothing(tmp_path, db_url, step):
    if ("taken" in step or "linked into" in step) and not db_url.startswith("sqlite"):
        pytest.skip("with several nodes (PostgreSQL) every original is copied: no taking whole")
    cfg = write_config_file(tmp_path, db_url)
    drop = tmp_path / "drop"
    files = {f"img{i}.dcm": write(drop / f"img{i}.dcm").read_bytes() for i in range(3)}
    files["junk.txt"] = b"not dicom " * 30
    ds = ct(sop_uid="1.2.826.0.1.3680043.99.7")  # two files, one UID, other bytes: a conflict
    files["a_first.dcm"] = write(drop / "a_first.dcm", ds).read_bytes()
    ds.InstitutionName = "edited"
    files["z_conflict.dcm"] = write(drop / "z_conflict.dcm", ds).read_bytes()
    (drop / "junk.txt").write_bytes(files["junk.txt"])
    if STEPS[step][3] == "other":
        for name in files:
            os.chown(drop / name, NOBODY, NOBODY)
    if STEPS[step][3] == "linked":
        (tmp_path / "links").mkdir()
        for name in files:
            os.link(drop / name, tmp_path / "links" / name)

    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    crash_at(cfg, *STEPS[step])
    result = run_cli(cfg, "scan", "--final")
    assert result.exit_code == 0, result.output

    assert list(drop.iterdir()) == []
    listed = json.loads(run_cli(cfg, "list", "--json").output)
    rejects = json.loads(run_cli(cfg, "rejects", "--json").output)
    assert len(listed) == 4 and {"img0.dcm", "img1.dcm", "img2.dcm"} < {i["source"] for i in listed}
    assert sorted(r["reason"] for r in rejects) == ["conflict", "not-dicom"]
    for i in listed:
        assert Path(i["stored_path"]).read_bytes() == files[i["source"]]
    for r in rejects:
        assert hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest() == hashes[r["source"]]
    verify = run_cli(cfg, "verify", "--json")
    assert verify.exit_code == 0
    report = json.loads(verify.output)
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["orphans"] == [] and report["temporary"] == []  # nothing left behind either
