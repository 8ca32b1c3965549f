"""Precision as a value (DESIGN.md section 2, "Backends": fp32, fp16 on a GPU, bf16 and int8 on
the CPU).

A precision names a form of the bundle's graphs (``Bundle.graph(name, precision)``), the
tolerances its parity gate uses (``cinemae.export.parity.TOLERANCES``) and the backends that run
it (``cinemae.runtime.backends.registry``). An unknown name is an error everywhere: it never
silently takes another precision's rules.

The dtype of a tensor in device memory (the decoder output the fused LCAS kernel reads) is a
separate value, a numpy dtype (``float32`` or ``float16``), carried as such from the engine or
session to the kernel.
"""

from __future__ import annotations

import numpy as np

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


def check_precision(precision: str) -> str:
    """``precision`` itself when it is one of :data:`PRECISIONS`; ValueError (one sentence)
    otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def float_dtype(name: str) -> np.dtype:
    """The numpy dtype of an ONNX Runtime / TensorRT float tensor type name:
    ``tensor(float)``/``FLOAT``/``float32`` -> float32, ``tensor(float16)``/``HALF``/``float16``
    -> float16. ValueError for anything else (bfloat16 has no numpy dtype)."""
    key = str(name).rsplit(".", 1)[-1].lower()
    table = {"tensor(float)": np.float32, "float": np.float32, "float32": np.float32,
             "tensor(float16)": np.float16, "half": np.float16, "float16": np.float16}
    if key not in table:
        raise ValueError(f"tensor type {name!r} is neither float32 nor float16")
    return np.dtype(table[key])


__all__ = ["PRECISIONS", "check_precision", "float_dtype"]
