"""Typed errors. Each message names the file or value and what was expected, in one line;
the CLI prints it as is and exits non-zero."""


class LenetError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(LenetError, ValueError):
    """A flag, preset or config value that is not allowed."""


class DataError(LenetError):
    """A data file or folder that is missing or malformed."""


class IDXError(DataError):
    """An IDX file that breaks the format (magic, dtype, dims, payload length)."""


class DownloadError(DataError):
    """A download that failed or whose checksum did not match."""


class CheckpointError(LenetError):
    """A checkpoint that is missing, malformed, unsafe, or for another spec."""


class RunFolderError(LenetError):
    """A run folder that cannot be created, written, or resumed."""


class DivergenceError(LenetError):
    """Training produced a non-finite loss."""
