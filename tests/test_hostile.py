"""Every kind of hostile or odd file ends with the right outcome, and the importer survives it.

The corpus comes from tools/hostile_corpus.py (40+ kinds: cut files, absurd lengths,
deep nesting, bad UIDs, links, FIFOs, odd names...). Each case is ingested as
settled and final (unchanged for incomplete_seconds), in sorted order.
"""

import os
import resource
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import hostile_corpus  # noqa: E402

from watcher import detect  # noqa: E402
from watcher.models import Instance, Rejection  # noqa: E402
from watcher.pipeline import ingest  # noqa: E402


def test_hostile_corpus_gets_the_expected_outcomes(config, tmp_path):
    cases = hostile_corpus.build(config.watch.drop_dir)
    assert len(cases) >= 40
    targets = [Path(os.path.realpath(config.watch.drop_dir / c.relpath)) for c in cases
               if c.reason == "symlink"]
    outside = {t: (t.stat().st_mtime_ns, t.is_file() and t.read_bytes()) for t in targets
               if t.exists() and config.watch.drop_dir not in t.parents}
    assert outside, "the corpus links to files outside the drop folder"
    found = {os.path.relpath(p, config.watch.drop_dir) for p, _ in
             detect.scan(config.watch.drop_dir, config.watch.ignore)}
    wrong = []
    for case in sorted(cases, key=lambda c: c.relpath):
        path = config.watch.drop_dir / case.relpath
        if case.expect == "ignored":
            if case.relpath in found:
                wrong.append((case.name, "ignored", "listed"))
            continue
        assert case.relpath in found, case
        outcome = ingest(path, config, final=True)
        got = (outcome.outcome, outcome.reason)
        if got != (case.expect, case.reason):
            wrong.append((case.name, (case.expect, case.reason), got, outcome.detail[:120]))
        if outcome.outcome == "rejected":
            assert outcome.detail, case
    assert not wrong, "\n".join(map(str, wrong))
    # every rejected file is kept where its row says
    for r in Rejection.select():
        assert os.path.lexists(r.path), r.source
    # what the links point at, outside the drop folder, was neither moved nor changed
    assert {t: (t.stat().st_mtime_ns, t.is_file() and t.read_bytes()) for t in outside} == outside
    # peak memory stayed far below the absurd declared lengths (4 GiB) and the sparse file (2 GiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 1_000_000  # KiB
    assert Instance.select().count() == sum(c.expect == "imported" for c in cases)
