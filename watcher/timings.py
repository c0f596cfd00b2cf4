"""How long imports take, per process: a histogram each importer keeps since it started and
reports with its heartbeat, so that /metrics (served by one process) shows every process's
(``dicom_watcher_import_seconds``)."""

import bisect
import threading

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


class Durations:
    def __init__(self, bounds=BOUNDS):
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> dict:
        """{"bounds", "counts" (per bucket, not cumulative), "sum"}: what a heartbeat stores."""
        with self._lock:
            return {"bounds": list(self.bounds), "counts": list(self._counts), "sum": self._sum}


IMPORTS = Durations()  # every outcome of every intake in this process (pipeline._log)


def cumulative(snapshot: dict) -> tuple[list[tuple[str, int]], float]:
    """Prometheus' buckets (``le`` as text, cumulative counts, ``+Inf`` last) and the sum."""
    buckets, total = [], 0
    bounds = snapshot.get("bounds", [])
    for bound, count in zip(bounds + ["+Inf"], snapshot.get("counts", [])):
        total += count
        buckets.append((str(bound) if bound == "+Inf" else repr(float(bound)), total))
    return buckets, float(snapshot.get("sum", 0.0))
