"""python -m bench.threadprofile OUT [dicom-watcher arguments…]

Runs the dicom-watcher CLI in this process with cProfile in *every* thread, and writes the
merged statistics to OUT (a pstats file). ``python -m cProfile`` alone profiles only the
main thread, which in ``dicom-watcher run`` does nothing but wait for SIGTERM: the work is
done by worker, observer and scheduler threads. Used by ``python -m bench --profile`` when
py-spy is not installed.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_in_thread(frame, event, arg):
    """The first profile event of a new thread: switch that thread to its own cProfile."""
    profile = cProfile.Profile()
    with _lock:
        _profiles.append(profile)
    profile.enable()  # replaces this hook for the current thread


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, args = argv[0], argv[1:]
    from watcher.cli import cli  # imported before profiling starts: start-up cost is not the point

    threading.setprofile(_start_in_thread)
    main_profile = cProfile.Profile()
    _profiles.append(main_profile)
    main_profile.enable()
    code = 0
    try:
        cli.main(args=args, prog_name="dicom-watcher")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        main_profile.disable()
        threading.setprofile(None)
        with _lock:
            stats = pstats.Stats(_profiles[0])
            for profile in _profiles[1:]:
                stats.add(profile)
        stats.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
