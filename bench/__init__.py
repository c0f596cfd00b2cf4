"""Benchmark for dicom-watcher: corpora, physical limits, and the real service beside them.

Run ``python -m bench --quick`` (see docs/benchmarks.md). Results are rows of
``{corpus, what, files, bytes, seconds, files_per_s, mb_per_s, procs, cache}``; the service's
rows add its memory, CPU, latency, outcomes and log problems, and ``vs_limit``.

  corpus.py, datasets.py  the corpora            limits.py    copy+hash+fsync, header parse
  service.py              the service, measured  process.py   one run of it as a subprocess
  backends.py             SQLite / PostgreSQL    results.py   rows, ratios, tables, JSON
  profiling.py, threadprofile.py                 --profile: py-spy, or cProfile in every thread
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
