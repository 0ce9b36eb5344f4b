"""Typed errors. Every message says what went wrong *and* what to do about it.

The command line turns any :class:`WsiAnomalyError` into one readable line and a non-zero exit
code; anything else is a bug and keeps its traceback.
"""


class WsiAnomalyError(Exception):
    """Base class for every error a user can cause and fix."""

    exit_code = 2


class InputNotFoundError(WsiAnomalyError):
    """A file or folder given on the command line does not exist."""


class UnsupportedSlideError(WsiAnomalyError):
    """The file exists but is not a slide any reader understands."""


class CorruptSlideError(WsiAnomalyError):
    """The slide opens (or looks like a slide) but its pixel data cannot be decoded."""


class ResolutionError(WsiAnomalyError):
    """No usable microns-per-pixel value (missing everywhere, or implausible)."""


class NoTissueError(WsiAnomalyError):
    """The slide has no tissue at the chosen settings: zero tiles."""

    exit_code = 3


class OutputExistsError(WsiAnomalyError):
    """An output already exists and ``--overwrite`` was not given."""


class InvalidInputError(WsiAnomalyError):
    """Bad option values, bad annotation files, empty image folders and the like."""


class WeightsUnavailableError(WsiAnomalyError):
    """Pretrained backbone weights cannot be loaded."""


class CheckpointError(WsiAnomalyError):
    """A checkpoint is missing, of another model, or of an incompatible version."""


class DeviceUnavailableError(WsiAnomalyError):
    """The requested compute device (e.g. CUDA) is not available on this machine."""


class OutputWriteError(WsiAnomalyError):
    """An output cannot be written: disk full, read-only, not writable, a name too long."""


class OutputLockedError(WsiAnomalyError):
    """Another run is writing the same output right now."""

    exit_code = 4


class NonFiniteScoresError(WsiAnomalyError):
    """A model produced NaN or infinite scores or maps: its results cannot be used."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects other than tensors and plain data (possible code execution)."""


#: Exit status of a cohort run that finished but where at least one slide failed (--skip-errors).
EXIT_SLIDES_FAILED = 5


class NotBrightfieldError(WsiAnomalyError):
    """The slide is not one a brightfield model can judge (e.g. fluorescence: a dark
    background with light in one or a few channels)."""

    exit_code = 6
