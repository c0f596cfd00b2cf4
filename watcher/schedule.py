"""Which path to look at next: each path queued at most once, never in two hands at once.

A heap ordered by due time; ``put`` moves a path earlier, never later. A path
that becomes due while a worker holds it waits until the worker releases it.
``pause`` holds everything back (the archive disk is full, the database is down).
"""

import heapq
import itertools
import threading


class Schedule:
    def __init__(self, clock):
        self._clock = clock
        self._heap = []
        self._due = {}  # path -> the time it is due (the live heap entry)
        self._busy = set()
        self._held = {}  # busy paths that became due meanwhile -> due time
        self._order = itertools.count()
        self._paused_until = 0.0
        self._closed = False
        self._cond = threading.Condition()

    def put(self, path: str, at: float) -> None:
        with self._cond:
            if path in self._busy:
                self._held[path] = min(at, self._held.get(path, at))
                return
            current = self._due.get(path)
            if current is not None and current <= at:
                return
            self._due[path] = at
            heapq.heappush(self._heap, (at, next(self._order), path))
            self._cond.notify()

    def take(self, timeout: float) -> str | None:
        """The next due path, now marked busy; None after ``timeout`` or once closed."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._closed:
                now = self._clock()
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded by an earlier put
                ready_at = max(self._heap[0][0], self._paused_until) if self._heap else None
                if ready_at is not None and ready_at <= now:
                    _, _, path = heapq.heappop(self._heap)
                    del self._due[path]
                    self._busy.add(path)
                    return path
                if now >= deadline:
                    return None
                wake = deadline if ready_at is None else min(deadline, ready_at)
                self._cond.wait(max(wake - now, 0.001))
            return None

    def take_due(self, most: int) -> list[str]:
        """Up to ``most`` more paths that are due now, marked busy; never waits."""
        taken = []
        with self._cond:
            now = self._clock()
            while len(taken) < most and self._heap and not self._closed:
                at, _, path = self._heap[0]
                if self._due.get(path) != at:
                    heapq.heappop(self._heap)  # superseded by an earlier put
                    continue
                if max(at, self._paused_until) > now:
                    break
                heapq.heappop(self._heap)
                del self._due[path]
                self._busy.add(path)
                taken.append(path)
        return taken

    def release(self, path: str) -> None:
        with self._cond:
            self._busy.discard(path)
            at = self._held.pop(path, None)
        if at is not None:
            self.put(path, at)

    def pause(self, seconds: float) -> None:
        with self._cond:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def busy_count(self) -> int:
        return len(self._busy)

    def __len__(self) -> int:
        return len(self._due)
