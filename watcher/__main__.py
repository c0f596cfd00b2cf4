"""``python -m watcher`` and the ``dicom-watcher`` script."""

import sys


def main() -> None:
    try:
        from .cli import cli
    except KeyboardInterrupt:  # Ctrl-C while Python loads the command: nothing has begun
        sys.exit(130)
    cli()


if __name__ == "__main__":  # (not when multiprocessing's spawn imports it as __mp_main__)
    main()
