"""flex-oracle's Triton kernels for FlexAttention (forward, backward, decode).

Without a CUDA device the whole process runs Triton's interpreter, so the
kernels run on CPU tensors; with one, they are compiled for CUDA tensors
(``TRITON_INTERPRET=1`` forces the interpreter; see ``kernels._runtime``).
"""

import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

from . import mods  # noqa: E402
from ._runtime import TilesTooLarge  # noqa: E402
from .api import DTYPES, Options, flex_attention, parse_kernel_options  # noqa: E402

__all__ = ["flex_attention", "mods", "Options", "parse_kernel_options", "DTYPES", "TilesTooLarge"]
