"""Environment defaults of the command line's own process, set before numpy loads (`apply`).

Two libraries under the calibrated paths spend CPU on these 2-core machines that the pruning needs:

* OpenBLAS's worker threads busy-wait after every multi-threaded call (2^28 cycles, ~0.1 s, by default)
  for the next one, beside onnxruntime's runs and the products' worker thread. The statistics and the
  repair's products already run on one BLAS thread (`calibration.single_threaded_blas`); what spun was the
  BLAS of the OBS scores, the ridge solves and the means between them (`blas_thread_server`: ~5% of all
  samples in ``perf``). ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles, OpenBLAS's minimum) puts them to sleep at once;
  waking one costs microseconds against calls of milliseconds.
* numpy advises transparent huge pages for arrays of 4 MiB and more, so the kernel zeroes each fresh array
  2 MiB at a time (`clear_page_erms`: ~5.5% of the samples), also the parts a row block never touches.
  ``NUMPY_MADVISE_HUGEPAGE=0`` leaves the pages at 4 KiB.

Measured in interleaved pairs of CLI runs against the libraries' own defaults (256 samples at 224x224,
``--target-params 80% --round-to 1``, 2 cores; bench/repair_speed_results.txt, session 54), the pruned models
bit-identical (neither setting changes what is computed), peak RSS the same:

    EfficientNet-Lite0, unconstrained best configuration    51.8 / 48.8 -> 38.6 / 36.7 s   (CPU 76 -> 48 s)
    ResNet-50, obs + seq, uniform                           70.9 / 70.7 / 70.4 -> 65.7 / 71.1 / 64.1 s
    ResNet-50, obs + seq, lamp (the default)                49.5 / 50.2 -> 48.1 / 45.8 s

Defaults only: a variable already in the environment wins. Nothing is set once numpy is loaded (a library
caller's process, the tests: the libraries read these variables when they load, so setting them later would
only mislead child processes). Child processes of the command inherit them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

__all__ = ["DEFAULTS", "apply"]

DEFAULTS: Mapping[str, str] = {
    "OPENBLAS_THREAD_TIMEOUT": "4",
    "NUMPY_MADVISE_HUGEPAGE": "0",
}


def apply(environ: MutableMapping[str, str] = os.environ, loaded: Mapping[str, object] = sys.modules) -> dict[str, str]:
    """Set the `DEFAULTS` missing from `environ`, unless numpy is in `loaded` already; returns what was set."""
    if "numpy" in loaded:
        return {}
    added = {name: value for name, value in DEFAULTS.items() if name not in environ}
    environ.update(added)
    return added
