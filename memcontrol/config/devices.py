"""Where and in which precision a model runs: the one reading of the ``device`` and ``dtype`` settings that every
job (search, fine-tune, audit) uses."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic.functional_validators import AfterValidator

DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device_name(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError("not a device: use auto, cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_device_name)]
DtypeName = Literal[DTYPES]


def resolve_device(name: str | None, worker_index: int = 0) -> str:
    """``auto`` (or nothing): the worker's share of the visible GPUs (round robin), else the CPU."""
    import torch

    if name not in (None, "auto"):
        return name
    if torch.cuda.is_available():
        return f"cuda:{worker_index % torch.cuda.device_count()}"
    return "cpu"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
