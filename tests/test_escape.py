"""Nothing leaves its folders: a sub-folder of the drop (or rejected) folder swapped for a
symbolic link, at any moment, never lets the service read, move, import, delete or prune a
file outside the drop, archive, rejected and done folders.

The attack that used to work, by anyone who can write the drop folder::

    mkdir drop/sub; ln junk drop/sub/victim.txt; cp ok.dcm drop/sub/victim.dcm
    mv drop/sub away; ln -s /some/decoy drop/sub

after which the service moved /some/decoy/victim.txt into rejected/ and imported, then
deleted, /some/decoy/victim.dcm. Each test here builds a decoy tree outside all our folders,
holding files named like the victims, and checks afterwards that every name in it is still
there with the same inode, link count, size, mtime, ctime and bytes, and that none of its
bytes reached the archive, the rejected folder, the drop folder or the database.
"""

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import make_config, wait_for
from dicomfiles import ct, write
from watcher import dispose, models, retrieve
from watcher.models import Event, Instance, Rejection
from watcher.pipeline import ingest
from watcher.service import Service

# watchdog warns when a folder it watches is swapped and watched again under the same path
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

TESTS = Path(__file__).resolve().parent
LONG_AGO = time.time() - 3600  # the decoy's timestamps: quiet for an hour, settled by any rule


# -- the decoy and what it looked like -----------------------------------------------------------

class Decoy:
    """A folder outside drop/archive/rejected with files named like the victims:
    victim.dcm (a valid DICOM), victim.txt, x.txt, a capture-like ``.dw~`` name,
    inner/ (the same again), inner/deeper/ and empty/ (empty folders)."""

    def __init__(self, folder: Path):
        self.root = folder
        self.uids = set()
        for where in (folder, folder / "inner"):
            ds = ct(patient_id="DECOY")
            self.uids.add(str(ds.SOPInstanceUID))
            write(where / "victim.dcm", ds)
            (where / "victim.txt").write_bytes(b"decoy text, never to be moved " + os.urandom(16))
            (where / "x.txt").write_bytes(b"decoy x, never to be replaced " + os.urandom(16))
            (where / f"{dispose.PRIVATE}0badc0de~victim.txt").write_bytes(b"decoy capture " + os.urandom(16))
        (folder / "inner" / "deeper").mkdir()
        (folder / "empty").mkdir()
        for root, dirs, files in os.walk(folder, topdown=False):
            for name in files + dirs:
                os.utime(os.path.join(root, name), (LONG_AGO, LONG_AGO), follow_symlinks=False)
        os.utime(folder, (LONG_AGO, LONG_AGO))
        self.before = snapshot(folder)
        self.hashes = {entry["sha256"] for entry in self.before.values() if entry["sha256"]}
        self.inodes = {(entry["dev"], entry["ino"]) for entry in self.before.values()}

    def assert_untouched(self) -> None:
        now = snapshot(self.root)
        changes = []
        for rel in sorted(set(self.before) | set(now)):
            if rel not in now:
                changes.append(f"{rel}: GONE (was {self.before[rel]})")
            elif rel not in self.before:
                changes.append(f"{rel}: NEW {now[rel]}")
            elif now[rel] != self.before[rel]:
                diff = {k: (self.before[rel][k], now[rel][k]) for k in now[rel]
                        if now[rel][k] != self.before[rel][k]}
                changes.append(f"{rel}: changed {diff}")
        assert not changes, "the decoy outside our folders was touched:\n  " + "\n  ".join(changes)

    def assert_nothing_of_it_in(self, *folders: Path) -> None:
        """No file below ``folders`` (links not followed) has the decoy's bytes or is one of its
        inodes, and the database knows none of its hashes or UIDs."""
        leaked = []
        for folder in folders:
            for path, st, digest in regular_files(folder):
                if digest in self.hashes or (st.st_dev, st.st_ino) in self.inodes:
                    leaked.append(str(path))
        assert not leaked, f"the decoy's files turned up in our folders: {leaked}"
        hashes, uids = list(self.hashes), list(self.uids)
        assert [i.source for i in Instance.select().where(
            Instance.sha256.in_(hashes) | Instance.sop_instance_uid.in_(uids))] == []
        assert [r.source for r in Rejection.select().where(Rejection.sha256.in_(hashes))] == []
        assert [(e.outcome, e.source) for e in Event.select().where(
            Event.sha256.in_(hashes) | Event.sop_instance_uid.in_(uids))] == []


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def snapshot(folder: Path) -> dict:
    """Every name below ``folder`` (itself included, links not followed) and its lstat + sha256."""
    tree = {}
    for root, dirs, files in os.walk(folder):
        for path in [root] + [os.path.join(root, n) for n in dirs + files]:
            st = os.lstat(path)
            tree[os.path.relpath(path, folder)] = {
                "mode": st.st_mode, "dev": st.st_dev, "ino": st.st_ino, "nlink": st.st_nlink,
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "sha256": sha256(path) if stat.S_ISREG(st.st_mode) else None}
    return tree


def regular_files(folder: Path):
    """(path, lstat, sha256) of every regular file below ``folder``, links not followed."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield path, st, sha256(path)


def our_folders(cfg) -> list[Path]:
    return [cfg.watch.drop_dir, cfg.archive.dir, cfg.archive.rejected_dir]


# -- with the service running ----------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["events", "polling"])
def service_config(request, tmp_path, db_url):
    cfg = make_config(tmp_path, db_url, watch={"settle_seconds": 1, "rescan_seconds": 1,
                                               "poll": request.param})
    models.connect(cfg.database.url)
    yield cfg
    models.database.close()


def still_imports(cfg, name: str) -> bool:
    """The service survived: a new file dropped now is imported."""
    write(cfg.watch.drop_dir / name)
    return wait_for(lambda: Instance.select().where(Instance.source == name).count() == 1, timeout=10)


def test_subfolder_swapped_for_a_link_moves_nothing_outside(service_config, tmp_path):
    """The old attack, once, slowly enough that the service has queued the victims (they wait
    out settle_seconds: a hard link is a creation, not a close) before the folder is swapped."""
    cfg = service_config
    drop = cfg.watch.drop_dir
    decoy = Decoy(tmp_path / "decoy")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "victim.txt").write_bytes(b"the attacker's junk " + os.urandom(16))
    write(junk / "victim.dcm")
    with Service(cfg):
        sub = drop / "sub"
        sub.mkdir()
        os.link(junk / "victim.txt", sub / "victim.txt")
        os.link(junk / "victim.dcm", sub / "victim.dcm")
        (sub / "inner").mkdir()
        os.link(junk / "victim.txt", sub / "inner" / "victim.txt")
        time.sleep(0.4)  # seen (event or rescan), not yet settled
        os.rename(sub, tmp_path / "away")
        os.symlink(decoy.root, sub)
        time.sleep(3)  # settle_seconds and two rescans: every queued path has had its turn
        assert still_imports(cfg, "after.dcm")
    decoy.assert_untouched()
    decoy.assert_nothing_of_it_in(*our_folders(cfg))


# The writer: ``rounds`` times, for each of ``subs`` sub-folders, either fill drop/subN with
# victims (some hard-linked in, which wait out settle_seconds; some written and closed in place,
# which are imported or rejected at once), or move a filled drop/subN away (outside the drop
# folder) and put a link to the decoy (or its inner folder) in its place, pausing 0-50 ms after
# each. How many rounds a folder stays real, or a link, is drawn at random: some are swapped
# the moment they are filled, some while their files are being imported (after settle_seconds,
# when the observer polls), and some links stay long enough for the victims queued before the
# swap to come due. At the end every folder still real is swapped too.
WRITER = textwrap.dedent("""
    import json, os, random, sys, time
    sys.path.insert(0, sys.argv[2])
    from dicomfiles import write
    a = json.loads(sys.argv[1])
    rng = random.Random(a["seed"])
    pause = lambda: time.sleep(rng.uniform(0, 0.05))
    placed = filled = swapped = 0
    taken = []
    real = {}  # n -> the round it is swapped in
    link_until = {}  # n -> the round it is filled again

    def fill(r, n):
        sub = os.path.join(a["drop"], f"sub{n}")
        try:
            os.unlink(sub)  # the link (unless the service rejected it already)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.join(sub, "inner"))
        base = os.path.join(a["junk"], f"r{r}-s{n}")
        write(base + ".dcm")
        with open(base + ".txt", "wb") as f:
            f.write(b"attacker junk %d %d " % (r, n) + os.urandom(16))
        os.link(base + ".dcm", os.path.join(sub, "victim.dcm"))
        os.link(base + ".txt", os.path.join(sub, "victim.txt"))
        write(os.path.join(sub, "inner", "victim.dcm"))
        with open(os.path.join(sub, "inner", "victim.txt"), "wb") as f:
            f.write(b"attacker junk inner %d %d " % (r, n) + os.urandom(16))
        with open(os.path.join(sub, "x.txt"), "wb") as f:
            f.write(b"attacker x %d %d " % (r, n) + os.urandom(16))
        return 5

    def swap(r, n):
        sub = os.path.join(a["drop"], f"sub{n}")
        try:
            os.rename(sub, os.path.join(a["away"], f"r{r}-sub{n}"))
        except FileNotFoundError:  # the service took the folder away (see the test below)
            taken.append(f"sub{n}")
        os.symlink(rng.choice(a["targets"]), sub)

    for r in range(a["rounds"]):
        for n in range(a["subs"]):
            if n in real and r >= real[n]:
                swap(r, n)
                swapped += 1
                del real[n]
                link_until[n] = r + rng.choice([1, 1, 2, 5, 10])
            elif n not in real and r >= link_until.get(n, 0):
                placed += fill(r, n)
                filled += 1
                real[n] = r + rng.choice([0, 0, 0, 1, 1, 2, 5, 10])
                if real[n] == r:
                    pause()
                    swap(r, n)
                    swapped += 1
                    del real[n]
                    link_until[n] = r + rng.choice([1, 1, 2, 5, 10])
            pause()
    for n in list(real):
        swap(a["rounds"], n)
        swapped += 1
    print(json.dumps({"placed": placed, "filled": filled, "swapped": swapped, "taken": taken}))
""")


def test_subfolders_swapped_for_links_during_imports_and_rejections_leave_the_decoy_untouched(
        service_config, tmp_path):
    cfg = service_config
    drop = cfg.watch.drop_dir
    decoy = Decoy(tmp_path / "decoy")
    (tmp_path / "away").mkdir()
    (tmp_path / "junk").mkdir()
    args = {"drop": str(drop), "away": str(tmp_path / "away"), "junk": str(tmp_path / "junk"),
            "targets": [str(decoy.root), str(decoy.root / "inner")],
            "rounds": 30, "subs": 6, "seed": 20260101}
    with Service(cfg):
        writer = subprocess.run([sys.executable, "-c", WRITER, json.dumps(args), str(TESTS)],
                                capture_output=True, text=True, timeout=60)
        assert writer.returncode == 0, writer.stderr[-3000:]
        done = json.loads(writer.stdout)
        assert done["filled"] == done["swapped"] >= 20 and done["placed"] == 5 * done["filled"], done
        time.sleep(3)  # the victims queued last wait out settle_seconds, then find the links
        assert still_imports(cfg, "after.dcm")
    decoy.assert_untouched()
    decoy.assert_nothing_of_it_in(*our_folders(cfg))
    # the race was real: files were imported and rejected while folders were being swapped
    assert Instance.select().where(Instance.source != "after.dcm").count() > 0
    assert Rejection.select().where(Rejection.reason == "not-dicom").count() > 0


def test_link_swapped_back_for_a_folder_is_not_rejected_with_all_it_holds(service_config, tmp_path):
    """drop/sub is a link when the service first sees it (queued, to wait out settle_seconds),
    then a real folder when its turn comes, holding a copy still being written: the folder is
    not a file to reject. Moving it would carry the copy in progress, and anything else in it,
    to the rejected folder, unrecorded and never imported."""
    cfg = service_config
    drop = cfg.watch.drop_dir
    decoy = Decoy(tmp_path / "decoy")
    data = write(tmp_path / "slow.dcm").read_bytes()
    with Service(cfg):
        sub = drop / "sub"
        os.symlink(decoy.root, sub)
        time.sleep(0.3)  # seen, not settled
        sub.unlink()
        sub.mkdir()
        with open(sub / "slow.dcm", "wb") as f:  # a slow copy into the new folder
            f.write(data[:len(data) // 2])
            f.flush()
            time.sleep(2.5)  # the queued path "sub" comes due meanwhile
            f.write(data[len(data) // 2:])
        assert wait_for(lambda: Instance.select().where(Instance.source == "sub/slow.dcm").count() == 1,
                        timeout=10), (
            f"sub/slow.dcm not imported; rejections: "
            f"{[(r.source, r.reason, r.path) for r in Rejection.select()]}")
    assert [(r.source, r.reason) for r in Rejection.select()] == []
    assert not (cfg.archive.rejected_dir / "sub").exists()
    decoy.assert_untouched()


# -- retry -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["drop", "rejected"], ids=["drop-sub-is-a-link", "rejected-sub-is-a-link"])
def test_retry_through_a_swapped_link_writes_nothing_outside(config, tmp_path, side):
    drop, rejected = config.watch.drop_dir, config.archive.rejected_dir
    decoy = Decoy(tmp_path / "decoy")
    junk = b"junk to be rejected, then retried " + os.urandom(16)
    (drop / "sub").mkdir()
    (drop / "sub" / "x.txt").write_bytes(junk)
    outcome = ingest(drop / "sub" / "x.txt", config)
    assert (outcome.outcome, outcome.reason) == ("rejected", "not-dicom")
    assert (rejected / "sub" / "x.txt").read_bytes() == junk
    digest = hashlib.sha256(junk).hexdigest()

    swapped = (drop if side == "drop" else rejected) / "sub"
    os.rename(swapped, tmp_path / "away")
    os.symlink(decoy.root, swapped)
    moved = retrieve.retry(config)

    decoy.assert_untouched()
    decoy.assert_nothing_of_it_in(drop, rejected, config.archive.dir)
    copies = [p for folder in (drop, rejected) for p, _, h in regular_files(folder) if h == digest]
    assert len(copies) <= 1, f"the retried file is there twice: {copies}"
    if side == "drop":
        # the rejected file is reachable: it goes back below the drop folder (beside the link,
        # never through it), or it stays where it is, its row with it
        assert len(copies) == 1, f"the retried file is lost: {copies}"
        if moved:
            assert moved == ["sub/x.txt"] and drop in copies[0].parents, copies
            assert Rejection.select().count() == 0
        else:
            assert copies == [rejected / "sub" / "x.txt"]
            assert [r.path for r in Rejection.select()] == [str(copies[0])]
    else:
        # the file is no longer below the rejected folder (the link took its folder's place):
        # nothing is put back, least of all the decoy's x.txt
        assert moved == [] and copies == []
        assert Rejection.select().count() == 1  # kept: the file may come back


# -- pruning empty folders -------------------------------------------------------------------------

def test_empty_decoy_folder_reached_through_a_link_is_never_pruned(tmp_path):
    drop = tmp_path / "drop"
    (drop / "real" / "empty").mkdir(parents=True)
    decoy = Decoy(tmp_path / "decoy")
    os.symlink(decoy.root, drop / "sub")
    os.symlink(decoy.root / "empty", drop / "empty-link")
    dispose.prune_empty_dirs(drop, 0)
    dispose.recover(drop)
    decoy.assert_untouched()
    assert not (drop / "real").exists()  # (prune works: a real empty folder below the drop went)
    assert (drop / "sub").is_symlink() and (drop / "empty-link").is_symlink()


# Flip drop/sub between a real folder (with empty sub-folders, as the decoy has) and a link to
# the decoy, as fast as it goes, until told to stop (or n flips): os.walk lists a real folder,
# then finds the link when it descends.
FLIPPER = textwrap.dedent("""
    import os, sys
    drop, decoy, away, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sub = os.path.join(drop, "sub")
    flips = 0
    for i in range(n):
        if os.path.exists(os.path.join(drop, "stop")):
            break
        try:
            if os.path.islink(sub):
                os.unlink(sub)
            os.makedirs(os.path.join(sub, "inner", "deeper"), exist_ok=True)
            os.makedirs(os.path.join(sub, "empty"), exist_ok=True)
            os.rename(sub, os.path.join(away, str(i)))
            os.symlink(decoy, sub)
            flips += 1
        except OSError:  # pruned under our feet: again
            continue
    print(flips)
""")


def test_prune_and_recover_racing_a_link_swap_remove_nothing_outside(tmp_path):
    drop, away = tmp_path / "drop", tmp_path / "away"
    drop.mkdir()
    away.mkdir()
    decoy = Decoy(tmp_path / "decoy")
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(drop), str(decoy.root), str(away), "20000"],
                               stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 4
        passes = 0
        while time.monotonic() < deadline and flipper.poll() is None:
            dispose.prune_empty_dirs(drop, 0)
            dispose.recover(drop)
            passes += 1
    finally:
        (drop / "stop").touch()
        out, _ = flipper.communicate(timeout=20)
    assert flipper.returncode == 0
    assert passes > 10 and int(out) > 100  # both sides really ran
    decoy.assert_untouched()


# -- a folder moved out of the drop folder while one of its files is imported -----------------

def _moved_folder_is_as_it_was(away: Path, inode: int, original: bytes, config) -> None:
    assert sorted(p.name for p in away.iterdir()) == ["a.dcm"], "only the file, under its own name"
    kept = away / "a.dcm"
    assert kept.stat().st_ino == inode and kept.read_bytes() == original
    assert kept.stat().st_mode & 0o777 == 0o644
    assert not [p for p in config.archive.dir.rglob("*.dcm") if p.stat().st_ino == inode], \
        "no archive original shares an inode with a file outside our folders"
    from watcher.verify import verify
    found = verify(config.archive.dir)
    assert found.ok and found.checked == 1


def test_folder_moved_away_during_the_commit_keeps_its_file_untouched(config, tmp_path):
    """The source keeps its folder open from reading to removal; if a person moves that folder
    out of the drop folder meanwhile, the import is recorded, and the file in the moved folder
    is left as it was: not removed, not renamed, not sharing the archive's inode."""
    from watcher.commit import commit_now
    src = write(config.watch.drop_dir / "sub" / "a.dcm")
    src.chmod(0o644)
    inode, original = src.stat().st_ino, src.read_bytes()
    away = tmp_path / "away"

    def commit_while_the_folder_moves(record):
        (config.watch.drop_dir / "sub").rename(away)
        return commit_now(record)

    outcome = ingest(src, config, commit=commit_while_the_folder_moves)
    assert outcome.outcome == "imported"
    assert Instance.select().count() == 1
    _moved_folder_is_as_it_was(away, inode, original, config)


def test_folder_moved_away_before_the_capture_keeps_its_file_untouched(config, tmp_path, monkeypatch):
    if not config.database.url.startswith("sqlite"):
        pytest.skip("with several nodes (PostgreSQL) every original is copied: no capture")
    src = write(config.watch.drop_dir / "sub" / "a.dcm")
    src.chmod(0o644)
    inode, original = src.stat().st_ino, src.read_bytes()
    away = tmp_path / "away"
    real_capture = dispose.capture

    def capture_after_the_move(source):
        (config.watch.drop_dir / "sub").rename(away)
        return real_capture(source)

    monkeypatch.setattr(dispose, "capture", capture_after_the_move)
    outcome = ingest(src, config)
    assert outcome.outcome == "imported"
    _moved_folder_is_as_it_was(away, inode, original, config)
