"""The service's share of distribution, run every few seconds by one importer of each node:
late arrivals follow their study, and stable studies go where the rules say.

It looks only at studies with new instances in the Import database (all of them once at
start-up); a study is stable when none arrived for ``distribute.stable_seconds``. Moves
are transactions (watcher/studies/distribute.py), so two nodes doing the same study, or a
crash half-way, move every instance exactly once.
"""

import datetime
import logging

from peewee import fn

from ..models import IMPORT, IMPORT_ID, Instance, Series, Study, utcnow
from . import databases, distribute, rules

LOGGER = logging.getLogger(__name__)
OVERLAP = datetime.timedelta(seconds=120)  # a batch's imported_at is taken before its commit
CHUNK = 500


class Routine:
    def __init__(self, config, clock=utcnow):
        self.rules = config.distribute.rules
        self.stable = datetime.timedelta(seconds=config.distribute.stable_seconds)
        self.clock = clock
        self.mark = None  # arrivals up to here have been looked at (less OVERLAP)
        self.waiting: dict[int, tuple[str, datetime.datetime]] = {}  # study id -> (uid, last arrival)

    def check(self) -> None:
        """At start-up: a rule naming a database that does not exist stops the service."""
        rules.check_targets(self.rules, databases.names())

    def run(self) -> None:
        now = self.clock()
        self._look(now)
        routed = set()
        uids = [uid for uid, _ in self.waiting.values()]
        for start in range(0, len(uids), CHUNK):
            for moved in distribute.follow(uids[start:start + CHUNK]):
                routed.add(moved.study_instance_uid)
        for study_id, (uid, last) in list(self.waiting.items()):
            if uid in routed:
                del self.waiting[study_id]
            elif last <= now - self.stable:
                del self.waiting[study_id]
                if self.rules:
                    self._apply(study_id, uid)

    def _look(self, now: datetime.datetime) -> None:
        query = (Instance.select(Study.id, Study.study_instance_uid, fn.MAX(Instance.imported_at))
                 .join(Series).join(Study)
                 .where(Instance.database_id == IMPORT_ID)
                 .group_by(Study.id, Study.study_instance_uid))
        if self.mark is not None:
            query = query.where(Instance.imported_at > self.mark - OVERLAP)
        for study_id, uid, at in query.tuples().iterator():
            at = Instance.imported_at.python_value(at)
            known = self.waiting.get(study_id)
            if known is None or at > known[1]:
                self.waiting[study_id] = (uid, at)
        self.mark = now

    def _apply(self, study_id: int, uid: str) -> None:
        try:
            values = rules.study_values(study_id)
        except Study.DoesNotExist:
            return
        if not any(values[rules.FOLDER]):  # nothing of it is left in import
            return
        rule, why = rules.choose(self.rules, values)
        if rule is None:
            return
        LOGGER.info("study %s is stable: %s", uid, why)
        distribute.move(distribute.Unit(uid), IMPORT, rule.to, actor=f"{rule}")


def dry_run(config) -> list[dict]:
    """For each study now in the Import database: which rule would take it, and why."""
    rules.check_targets(config.distribute.rules, databases.names())
    held = (Study.select(Study.id, Study.study_instance_uid).where(
        (Study.database_id == IMPORT_ID) & Study.id.in_(
            Series.select(Series.study).where(Series.id.in_(
                Instance.select(Instance.series).where(Instance.database_id == IMPORT_ID))))))
    out = []
    for study in held.order_by(Study.study_instance_uid):
        rule, why = rules.choose(config.distribute.rules, rules.study_values(study.id))
        out.append({"study_instance_uid": study.study_instance_uid,
                    "to": rule.to if rule else None, "why": why})
    return out
