"""A quiet console: what Ray, Ray Data, DeepSpeed and torch print inside a worker that nobody can
act on. Real warnings and errors stay.

Ray Train's own `ray.train.*` INFO lines (worker group start, process group, "Checkpoint
successfully created") are the driver's to silence: RunConfig(logging_config=LoggingConfig(
log_level="WARNING")) keeps them in Ray Train's log files and off the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings

NOISY_WARNINGS = (  # (message regex, category): deprecations inside libraries, not in our code
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),  # DeepSpeed ZeRO, torch 2.13
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", FutureWarning),  # DeepSpeed ZeRO-3, torch 2.13
)
NOISY_PRINTS = re.compile(r"^DeepSpeed \S+ built successfully$")  # a print() per process in init_distributed


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_RAY_DATA_PROGRESS_OFF = _DropMessages("Progress bars disabled")


def quiet_worker() -> None:
    """Called first in every worker: silences known noise, keeps real warnings and errors."""
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Ray Train logs every ray.train.report of every rank ("Reporting training result N:
    # TrainingReport(...every metric...)", ~1,000 characters) at INFO on a logger named after
    # its source file, outside the `ray.train` tree that LoggingConfig governs.
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # Ray Data reads each rank's packs here: "Dataset ... execution finished" at INFO, and a
    # warning that progress bars are off (on purpose: RAY_DATA_DISABLE_PROGRESS_BARS).
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    progress = logging.getLogger("ray.data._internal.progress")
    if _RAY_DATA_PROGRESS_OFF not in progress.filters:
        progress.addFilter(_RAY_DATA_PROGRESS_OFF)


@contextlib.contextmanager
def dropping_prints(pattern: re.Pattern):
    """Run a block with its stdout captured; lines matching `pattern` are dropped, the rest
    printed after it."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines() if not pattern.match(line)]
        if kept:
            print("\n".join(kept), flush=True)
