"""Benchmark for dicom-watcher: corpora, physical limits, later the service itself.

Run ``python -m bench --quick``. Results are rows of
``{corpus, what, files, bytes, seconds, files_per_s, mb_per_s, procs, cache}``.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
