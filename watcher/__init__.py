"""dicom-watcher: import DICOM files from a drop folder, original bytes unmodified."""

import logging

__version__ = "0.1.0"
__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
