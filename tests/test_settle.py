"""settle.py with a fake clock: what counts as quiet, and what makes an incomplete file final."""

import os

from watcher import settle


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_mtime_in_the_future_settles_by_observation(tmp_path):
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x")
    st = os.stat(path)
    wall = st.st_ctime - 3600  # the wall clock is an hour behind the file's stamps
    clock = FakeClock()
    observed = settle.Observed(clock)
    assert settle.wait_seconds(st, wall, 2, observed=observed.unchanged_for(path, st)) == 2
    clock.now += 2
    assert settle.wait_seconds(st, wall, 2, observed=observed.unchanged_for(path, st)) == 0


def test_wall_clock_jumping_forward_never_makes_a_file_final(tmp_path):
    """A file written just now looks a day old to a clock that jumped a day ahead: it may be
    looked at, but only our own observation can turn "incomplete" into a rejection."""
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x")
    st = os.stat(path)
    wall = st.st_ctime + 86400
    clock = FakeClock()
    observed = settle.Observed(clock)
    seen = observed.unchanged_for(path, st)
    assert settle.wait_seconds(st, wall, 2, observed=seen) == 0
    assert not settle.is_final(seen, 300)
    clock.now += 299
    assert not settle.is_final(observed.unchanged_for(path, st), 300)
    clock.now += 1
    assert settle.is_final(observed.unchanged_for(path, st), 300)


def test_a_change_starts_the_observation_again(tmp_path):
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x")
    clock = FakeClock()
    observed = settle.Observed(clock)
    observed.unchanged_for(path, os.stat(path))
    clock.now += 250
    with open(path, "ab") as f:
        f.write(b"y")
    assert observed.unchanged_for(path, os.stat(path)) == 0
    clock.now += 250
    assert not settle.is_final(observed.unchanged_for(path, os.stat(path)), 300)
