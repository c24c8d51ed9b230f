"""The project's own exceptions.

Every error a user can cause (bad file, missing weights, wrong option) is a ``MemcontrolError``: the command
line prints its message on one line and exits non-zero instead of showing a traceback.
"""


class MemcontrolError(Exception):
    """An error with a message meant for the user."""


class DataError(MemcontrolError):
    """An input item (image, DICOM file, manifest row) that cannot be used; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingWeightsError(MemcontrolError):
    """A local weight file or folder that a component needs is not there."""

    def __init__(self, what: str, path, option: str):
        super().__init__(f"{what} not found at '{path}'. Pass a local file or folder with {option} "
                         "(weights are never downloaded).")


class UnsafeCheckpointError(MemcontrolError):
    """A checkpoint that could only be loaded by running code from the file."""


class MaskError(MemcontrolError):
    """A mask that does not fit the model it is applied to."""


class ConfigError(MemcontrolError):
    """A configuration file or option that is wrong."""
