"""Reading weight files without ever running code from them.

Safetensors files are read as they are. Pickle-based files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) go through
``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors and plain containers; a file that needs
anything else (a class, a function call: the way a malicious checkpoint runs code) is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .errors import DataError, MissingWeightsError, UnsafeCheckpointError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def load_state_dict(path: str | Path, what: str = "weight file", option: str = "the matching option") -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(what, path, option)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise DataError(path, f"not a readable safetensors file ({err})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file needs to run code to unpickle "
                f"({str(err).splitlines()[0]}). Convert it to safetensors from a trusted environment."
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise DataError(path, f"not a readable torch checkpoint ({str(err).splitlines()[0]})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a state dict, found {type(obj).__name__}")
        return obj
    raise DataError(path, f"unknown weight file type '{path.suffix}' (use .safetensors, or .pt/.bin/.pth)")
