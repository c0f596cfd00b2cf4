"""python -m bench.rulecost [N]: the CPU that distribution rules add to an import.

Imports N small files (default 10,000) with ``scan`` in this process, then lets the service's
routine (watcher/studies/routine.py) apply two rules to every stable study, and prints the
routine's CPU per instance as a share of the import's. The issue's target: under 5 %.
"""
import datetime, os, shutil, sys, tempfile, time
from pathlib import Path
from bench import corpus
from watcher import config as C, models
from watcher.sweep import sweep
from watcher.studies import databases
from watcher.studies.routine import Routine
from watcher.models import Instance

work = Path(tempfile.mkdtemp(prefix="dicom-rulecost-", dir=os.environ.get("TMPDIR", "/work")))
paths = corpus.make_small(work / "drop", int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
cfg = C.from_dict({"watch": {"drop_dir": "drop", "settle_seconds": 1}, "archive": {"dir": "archive", "rejected_dir": "rejected"},
                   "database": {"url": f"sqlite:///{work}/w.db"},
                   "distribute": {"stable_seconds": 1, "rules": [
                       {"to": "trial-a", "match": {"PatientID": {"regex": "[02468]$"}}},
                       {"to": "trial-b", "match": {"Modality": "MR", "folder": "pat*/study*/*"}}]}}, base=work)
models.connect(cfg.database.url)
databases.create("trial-a"); databases.create("trial-b")
time.sleep(1.1)
t0 = time.process_time(); s = sweep(cfg, final=True); ingest = time.process_time() - t0
n = Instance.select().count()
later = [models.utcnow() + datetime.timedelta(seconds=5)]
r = Routine(cfg, clock=lambda: later[0])
t0 = time.process_time(); r.run(); routine = time.process_time() - t0
moved = Instance.select().where(Instance.database_id != 1).count()
print(f"{n} instances; scan CPU {ingest*1000/n:.3f} ms/instance (one process, in-process); routine CPU {routine*1000/n:.4f} ms/instance "
      f"= {100*routine/ingest:.2f} % of the import's; {moved} moved by rules; {len(r.waiting)} left waiting")
shutil.rmtree(work, ignore_errors=True)
