"""python -m bench [--quick] [--catalog] [--web] [--receive] [--replicate] [--out results.json]
[--workdir DIR] [--keep] [--profile]

Generates the corpora in a fresh folder under --workdir, runs every measurement in
MEASUREMENTS on every corpus (the physical limits, then the real service), prints the
tables and optionally writes JSON. --profile instead runs only the small batch with the
service under py-spy (or cProfile) and prints where its time goes.

Example: python -m bench --quick --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom

from . import catalog, corpus, receive, replicate, service, web
from .limits import measure_limits
from .results import (Measurement, add_ratios, make_row, markdown_table, service_table, spread_table,
                      write_json)

LOGGER = logging.getLogger("bench")

# Every measurement runs on every corpus, in this order. main() appends bench/service.py's
# measure_service(corpus, paths, scratch) -> rows, configured for --quick or full.
MEASUREMENTS: list[Measurement] = [measure_limits]


@dataclass(frozen=True)
class Plan:
    small_count: int
    large_sizes: tuple[int, ...]
    corpora: tuple[str, ...] = ("small", "real", "large")


QUICK = Plan(small_count=1_000, large_sizes=(20_000_000,) * 2)
FULL = Plan(small_count=20_000, large_sizes=(300_000_000,) * 3 + (2 << 30,))


def make_corpus(name: str, plan: Plan, dest: Path, meta: dict) -> list[Path]:
    if name == "small":
        return corpus.make_small(dest, plan.small_count)
    if name == "real":
        survey = corpus.survey_testdata()
        meta["real_corpus"] = survey.summary()
        return corpus.make_real(dest, survey)
    if name == "large":
        return corpus.make_large(dest, plan.large_sizes)
    raise ValueError(f"unknown corpus {name!r}; choose from small, real, large")


def generate_corpora(plan: Plan, root: Path, meta: dict) -> tuple[dict[str, list[Path]], list[dict]]:
    """Write each corpus under root/<name>; one "generate" row each (time includes sync)."""
    corpora, rows = {}, []
    for name in plan.corpora:
        started = time.perf_counter()
        paths = make_corpus(name, plan, root / name, meta)
        os.sync()
        seconds = time.perf_counter() - started
        if name in ("small", "large"):
            corpus.check_native_pixel_data(max(paths, key=lambda p: p.stat().st_size))
        size = sum(p.stat().st_size for p in paths)
        rows.append(make_row(name, "generate", files=len(paths), bytes_=size, seconds=seconds))
        rows[-1]["load_1m"] = [None, round(os.getloadavg()[0], 2)]
        corpora[name] = paths
    return corpora, rows


def run_measurements(corpora: dict[str, list[Path]], scratch: Path,
                     measurements: list[Measurement]) -> list[dict]:
    """Every measurement on every corpus; rows without their own load average get the
    1-minute load before and after the measurement that made them."""
    rows = []
    for measure in measurements:
        for name, paths in corpora.items():
            load = round(os.getloadavg()[0], 2)
            LOGGER.info("%s on %s (%d files), load %.2f", measure.__name__, name, len(paths), load)
            made = measure(name, paths, scratch)
            for row in made:
                row.setdefault("load_1m", [load, round(os.getloadavg()[0], 2)])
            rows.extend(made)
    return rows


def describe_host(workdir: Path) -> dict:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    resolved = str(workdir.resolve())
    mount = max((m for m in mounts if resolved.startswith(m[1].rstrip("/") + "/") or resolved == m[1]),
                key=lambda m: len(m[1]), default=None)
    return {
        "python": platform.python_version(), "pydicom": pydicom.__version__,
        "kernel": platform.release(), "cpus": os.cpu_count(),
        "filesystem": f"{mount[2]} at {mount[1]} ({mount[3]})" if mount else "unknown",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small corpora, about a minute")
    parser.add_argument("--out", type=Path, help="write {meta, rows} as JSON here")
    parser.add_argument("--workdir", type=Path, default=Path("/work") if Path("/work").is_dir() else None,
                        help="parent of the temporary corpus folder (same disk as the archive)")
    parser.add_argument("--corpora", default=None, help="comma-separated subset of small,real,large")
    parser.add_argument("--small-count", type=int, default=None, help="instances in the small corpus")
    parser.add_argument("--keep", action="store_true", help="keep the corpus folder afterwards")
    parser.add_argument("--only", choices=("limits", "service"), default=None,
                        help="run only the physical limits or only the service measurements")
    parser.add_argument("--backends", default="sqlite,postgres",
                        help="service databases: comma-separated subset of sqlite,postgres")
    parser.add_argument("--workers", type=int, default=None,
                        help="import.workers for the service (by default its own default)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="keep every service run's log here (default: a dicom-bench-logs-* "
                             "folder in the temporary directory)")
    parser.add_argument("--profile", action="store_true",
                        help="only the small batch (5,000 files; --small-count to change), with the "
                             "service under py-spy (or cProfile), and print its top functions")
    parser.add_argument("--catalog", action="store_true",
                        help="only the study-database catalog at scale (bench/catalog.py): "
                             "1,000,000 instances (--quick: 20,000), databases/status/distribute timed")
    parser.add_argument("--receive", action="store_true",
                        help="only the DICOM receiver against storescp, Orthanc and pynetdicom alone (bench/receive.py): "
                             "2,000 small objects, 3 x 200 MB, paced latency (--quick: 300, 1 x 20 MB); "
                             "with --repeat N, N rounds; with --profile, dicom-watcher's under py-spy")
    parser.add_argument("--web", action="store_true",
                        help="only the web app and DICOMweb on a 1,000,000-instance catalog (bench/web.py): "
                             "API/page/QIDO latency, WADO-RS and zip of a 2 GB original (--quick: "
                             "20,000, 200 MB)")
    parser.add_argument("--replicate", action="store_true",
                        help="only replication (bench/replicate.py): 2,000 x 0.5 MB from a second "
                             "dicom-watcher and from Orthanc, and 1 x 2 GB, beside the durable-copy "
                             "limit (--quick: 200, 1 x 200 MB)")
    parser.add_argument("--profile-tool", choices=("auto", "py-spy", "cprofile"), default="auto")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also measure the service batches of git revision REV (its watcher/ "
                             "taken with git archive), interleaved with this checkout's, in the same run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the limits and the service batches N times (the stream, backlog and "
                             "memory rows once) and print each figure's median and spread")
    return parser.parse_args(argv)


def service_settings(args: argparse.Namespace, log_dir: Path,
                     variants: tuple[service.Variant, ...] = ()) -> service.Settings:
    base = service.QUICK if args.quick else service.FULL
    return replace(base, backends=tuple(args.backends.split(",")), log_dir=log_dir, workers=args.workers,
                   variants=variants)


def baseline_variant(rev: str, dest: Path) -> service.Variant:
    """Revision ``rev``'s ``watcher/`` unpacked into ``dest``, run with this Python and its
    installed dependencies, ahead of the installed package on the path."""
    repo = Path(__file__).resolve().parents[1]
    full = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True,
                          capture_output=True, text=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", full, "watcher"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    command = ("env", f"PYTHONPATH={dest}", sys.executable, "-m", "watcher")
    return service.Variant(label=f" @{full}", command=command, code=f"{full} (baseline)")


def run_profile(args: argparse.Namespace, plan: Plan, root: Path, log_dir: Path) -> int:
    from .profiling import run_profile as profile_batch

    count = args.small_count or (plan.small_count if args.quick else 5_000)
    paths = corpus.make_small(root / "corpora" / "small", count)
    os.sync()
    row, summary = profile_batch("small", paths, root / "scratch", service_settings(args, log_dir),
                                 tool=args.profile_tool, out_dir=log_dir)
    print(service_table([row]))
    print(f"\n{row['files_per_s']} files/s under the profiler (it slows the service down)\n")
    print(summary)
    if args.out:
        write_json(args.out, [row], {"profile": summary, **describe_host(root)})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C: services stopped, databases and folders removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # real test files are noisy on purpose
    plan = QUICK if args.quick else FULL
    if args.corpora:
        plan = replace(plan, corpora=tuple(args.corpora.split(",")))
    if args.small_count is not None:
        plan = replace(plan, small_count=args.small_count)
    root = Path(tempfile.mkdtemp(prefix="dicom-bench-", dir=args.workdir))
    log_dir = args.logs or Path(tempfile.gettempdir()) / f"dicom-bench-logs-{time.strftime('%Y%m%d-%H%M%S')}"
    catalog_rows: list[dict] = []
    receive_rows: list[dict] = []
    meta = {"quick": args.quick, "workdir": str(root), "service_logs": str(log_dir), **describe_host(root)}
    try:
        if args.receive and args.profile:
            row, summary = receive.profile(root / "scratch", args.quick, log_dir)
            print(receive.table([row | {"case": "small"}]) + "\n\n" + summary)
            return 0
        if args.profile:
            return run_profile(args, plan, root, log_dir)
        if args.receive:
            receive_rows = receive.measure(root / "scratch", args.quick, args.repeat, log_dir)
            print(receive.table(receive_rows))
            if args.out:
                write_json(args.out, receive_rows, meta)
            return 0
        if args.replicate:
            replicate_rows = replicate.measure(root / "scratch", args.quick, log_dir)
            print(replicate.table(replicate_rows))
            if args.out:
                write_json(args.out, replicate_rows, meta)
            return 0
        if args.web:
            web_rows = web.measure(args.quick, tuple(args.backends.split(",")), root, log_dir)
            print(web.table(web_rows))
            if args.out:
                write_json(args.out, web_rows, meta)
            return 0
        if args.catalog:
            catalog_rows = catalog.measure(args.quick, tuple(args.backends.split(",")), root)
            print(catalog.table(catalog_rows))
            if args.out:
                write_json(args.out, catalog_rows, meta)
            return 0
        variants = ()
        if args.baseline:
            variants = (service.THIS_CHECKOUT, baseline_variant(args.baseline, root / "baseline"))
        corpora, rows = generate_corpora(plan, root / "corpora", meta)
        for round_ in range(1, args.repeat + 1):
            measurements = {"limits": [measure_limits], "service": []}.get(args.only, list(MEASUREMENTS))
            if args.only != "limits":
                settings = replace(service_settings(args, log_dir, variants), extras=round_ == 1)
                measurements.append(service.measurement(settings))
            made = run_measurements(corpora, root / "scratch", measurements)
            for row in made:
                row["round"] = round_
            rows += made
        if args.quick and args.only is None:  # CI: the catalog at its quick size too (~20 s)
            catalog_rows = catalog.measure(True, tuple(args.backends.split(",")), root)
            receive_rows = receive.measure(root / "scratch", True, 1, log_dir)  # ~1 min
    finally:
        if args.keep:
            LOGGER.info("corpora kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    caches = sorted({row["cache"] for row in rows if row["cache"] != "n/a"})
    meta["page_cache"] = caches
    add_ratios(rows)
    print(markdown_table(rows))
    if args.repeat > 1:
        print("\n" + spread_table(rows))
    print(f"\npage cache before each measurement: {', '.join(caches) or 'n/a'} "
          f"(cold = sync + drop_caches succeeded); MB = 10^6 bytes; real corpus: {meta.get('real_corpus')}")
    if any(row.get("backend") for row in rows):
        codes = list(dict.fromkeys(row["watcher_code"] for row in rows if row.get("watcher_code")))
        meta["watcher_code"] = codes
        print("\n" + service_table(rows))
        changed = " (it changed during the benchmark!)" if len(codes) > 1 else ""
        print(f"\nservice code{changed}: {', '.join(codes)}; service logs: {log_dir}")
    if catalog_rows:
        print("\nStudy databases at scale (bench/catalog.py):\n" + catalog.table(catalog_rows))
    if receive_rows:
        print("\nThe DICOM receiver and its peers (bench/receive.py):\n" + receive.table(receive_rows))
    if args.out:
        write_json(args.out, rows + catalog_rows + receive_rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
