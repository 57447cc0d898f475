"""The project's own error types, in one torch-free module so every job can catch them cheaply.

Policy (one for the whole package): a wrong *type* is a TypeError, a wrong *value* a ValueError
(or one of the subclasses below); problems of the machine (no device, no network, a full disk) are
their own types. `cli.run_job` turns every error in `PROJECT_ERRORS` into a one-line message.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DeviceUnavailableError", "DownloadError", "PROJECT_ERRORS"]


class DeviceUnavailableError(RuntimeError):
    """The requested device type exists in torch but not on this machine (a setup problem, not a bug)."""


class DownloadError(RuntimeError):
    """A download failed for good (after retries, or with a status that retrying cannot fix)."""


class CheckpointError(ValueError):
    """A checkpoint exists but is unusable (corrupt, truncated, incompatible)."""


# What a job reports in one line. OSError covers missing files, permissions and a full disk;
# FloatingPointError a diverged training run.
PROJECT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, DeviceUnavailableError, DownloadError, FloatingPointError,
)
