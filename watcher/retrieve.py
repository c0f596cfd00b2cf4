"""Get files back out: rejected files back into the drop folder, stored originals to a folder."""

import os
import shutil
from pathlib import Path



from . import catalog, dispose
from .config import Config
from .names import from_text, to_text
from .models import Instance, Patient, Rejection, Series, Study, write_transaction


def retry(config: Config, sources=()) -> list[str]:
    """Move rejected files (all, or those with these ``source`` paths) back into the drop folder."""
    query = Rejection.select().order_by(Rejection.id)
    if sources:
        query = query.where(Rejection.source.in_(list(sources)))
    moved = []
    for r in query:
        path = Path(from_text(r.path))
        if not os.path.lexists(path):
            continue
        dest = dispose.free_path(config.watch.drop_dir, from_text(r.source))
        dispose.move(path, dest)
        with write_transaction():
            r.delete_instance()
            catalog.record_event("retried", r.source, config.import_.node, sha256=r.sha256,
                                 reason=r.reason, detail=f"put back into the drop folder as "
                                 f"{to_text(os.path.relpath(dest, config.watch.drop_dir))}")
        moved.append(r.source)
    return moved


def export(config: Config, uid: str, dest: Path) -> list[Path]:
    """Copy the originals of an instance, series, study or patient (by UID or Patient ID)."""
    query = (Instance.select(Instance, Series, Study, Patient)
             .join(Series).join(Study).join(Patient)
             .where((Instance.sop_instance_uid == uid) | (Series.series_instance_uid == uid)
                    | (Study.study_instance_uid == uid) | (Patient.patient_id == uid)))
    written = []
    for i in query:
        target = dest / i.series.study.study_instance_uid / i.series.series_instance_uid
        target.mkdir(parents=True, exist_ok=True)
        out = target / f"{i.sop_instance_uid}.dcm"
        shutil.copyfile(config.archive.dir / i.stored_path, out)
        written.append(out)
    return written


