"""Which device a command computes on, and how provenance names it."""

from __future__ import annotations

import os
import platform
from typing import Any

from dpdm.errors import DPDMError


def pick_device(preference: str = "auto"):
    """CUDA when there is one (or when asked), CPU otherwise. `preference`: auto, cpu,
    cuda or cuda:N (the config's `device`)."""
    import re

    import torch

    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", str(preference)):
        raise DPDMError(f"device '{preference}' is not one of auto, cpu, cuda, cuda:N")

    if preference == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise DPDMError(f"device '{preference}' was requested but CUDA is not available; use --device cpu or auto")
    return torch.device(preference)


def device_name(device: Any = None) -> str:
    import torch

    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
