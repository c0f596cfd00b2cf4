"""The service, SIGKILLed again and again while files arrive, loses nothing and duplicates nothing.

A reduced run of tools/crash_harness.py (5 rounds, ~300 files, two large
files of ~20 MB, one of them copied in slowly) on SQLite and on PostgreSQL.
The full run is ``python tools/crash_harness.py --rounds 20 --files 3000``.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import crash_harness  # noqa: E402


@pytest.mark.slow
def test_killed_service_loses_and_duplicates_nothing(tmp_path, db_url):
    result = crash_harness.run(tmp_path / "crash", rounds=5, files=300, database=db_url, seed=7,
                               large=2, large_mb=(19, 22), timeout=60)
    report = crash_harness.summary(result)
    assert result.survived == 5, report
    assert result.files == 300, report
    assert result.lost == 0, report
    assert result.duplicated == 0, report
    assert result.misfiled == 0 and result.foreign_rows == 0, report
    assert result.instance_rows == result.distinct_uids, report
    assert result.left_in_drop == 0, report
    assert result.verify_ok, report
    assert result.final_exit == 0, report
    assert result.problems == [], report
