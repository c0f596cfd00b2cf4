"""/metrics in the Prometheus text format, computed from the database when scraped: right
whichever process (or node) did the work. Labels name outcomes, databases and nodes, never a
patient, a file or a UID."""

import json
import logging
import os

from peewee import fn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import report, timings
from ..models import Event, Heartbeat, Rejection, Waiting, utcnow
from ..studies import databases

LOGGER = logging.getLogger(__name__)
PREFIX = "dicom_watcher"


class _Collector:
    def __init__(self, config):
        self.config = config

    def collect(self):
        up = GaugeMetricFamily(f"{PREFIX}_database_up", "1 if the database answered this scrape")
        try:
            families = list(self._from_database())
        except Exception as exc:  # (the database is down: say so, and what the disk says)
            LOGGER.warning("metrics: the database did not answer: %s", exc)
            families = []
        up.add_metric([], 1 if families else 0)
        yield up
        yield from families
        free = GaugeMetricFamily(f"{PREFIX}_archive_free_bytes", "bytes free for the archive")
        try:
            fs = os.statvfs(self.config.archive.dir)
            free.add_metric([], fs.f_bavail * fs.f_frsize)
            yield free
        except OSError:
            pass

    def _from_database(self):
        outcomes = CounterMetricFamily(f"{PREFIX}_outcomes", "outcomes recorded in the history, by "
                                       "outcome and intake (folder, dicom, upload, replication; empty "
                                       "for distributions and retries)", labels=["outcome", "intake"])
        for outcome, intake, n in (Event.select(Event.outcome, Event.intake, fn.COUNT(Event.id))
                                   .group_by(Event.outcome, Event.intake).tuples()):
            outcomes.add_metric([outcome, intake or ""], n)
        yield outcomes
        held = GaugeMetricFamily(f"{PREFIX}_pending_files", "files the service holds back in the "
                                 "drop folder, by state (incomplete, open-for-writing, retrying…)",
                                 labels=["state"])
        for state, n in Waiting.select(Waiting.state, fn.COUNT(Waiting.path)).group_by(Waiting.state).tuples():
            held.add_metric([state], n)
        yield held
        per = databases.listing()
        instances = GaugeMetricFamily(f"{PREFIX}_instances", "instances held, by study database",
                                      labels=["database"])
        size = GaugeMetricFamily(f"{PREFIX}_stored_bytes", "bytes of the originals held, by study "
                                 "database", labels=["database"])
        for d in per:
            instances.add_metric([d["name"]], d["instances"])
            size.add_metric([d["name"]], d["bytes"])
        yield instances
        yield size
        rejected = GaugeMetricFamily(f"{PREFIX}_rejected_files", "files in the rejected folder")
        rejected.add_metric([], Rejection.select().count())
        yield rejected
        now = utcnow()
        nodes = GaugeMetricFamily(f"{PREFIX}_node_running", "1 if the node reports running "
                                  "(not paused, stopped or silent)", labels=["node"])
        queue = GaugeMetricFamily(f"{PREFIX}_node_queue_depth", "files due at the node's last "
                                  "heartbeat", labels=["node"])
        associations = GaugeMetricFamily(f"{PREFIX}_dicom_associations", "DICOM associations open "
                                         "at the node's last heartbeat", labels=["node"])
        durations = HistogramMetricFamily(f"{PREFIX}_import_seconds", "how long each object took "
                                          "from being looked at to its outcome, by node (since the "
                                          "node's process started)", labels=["node"])
        for h in Heartbeat.select():
            nodes.add_metric([h.node], 1 if report.node_state(h, now) == "running" else 0)
            queue.add_metric([h.node], h.queue_depth)
            associations.add_metric([h.node], h.associations)
            if h.durations:
                buckets, total = timings.cumulative(json.loads(h.durations))
                durations.add_metric([h.node], buckets, total)
        yield nodes
        yield queue
        yield associations
        yield durations


def registry(config) -> CollectorRegistry:
    """This app's own registry (never the process-wide default)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(config))
    return reg


def scrape(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


__all__ = ["registry", "scrape"]
