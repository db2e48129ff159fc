"""Tensors on the wire: safetensors (no code runs on load, unlike pickle or torch.load).

Several named groups of arrays share one safetensors blob, keyed `group/name`, so a message
carries, say, the global parameters and Scaffold's control variate in one bulk part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedpod.wire.codec import Buffer, DecodeError

Arrays = dict[str, Any]


def encode_groups(groups: Mapping[str, Mapping[str, Any]]) -> bytes:
    flat = {f"{group}/{name}": np.ascontiguousarray(value) for group, arrays in groups.items()
            for name, value in arrays.items()}
    return bytes(save(flat))


def decode_groups(data: Buffer) -> dict[str, Arrays]:
    try:
        flat = load(bytes(data))
    except (SafetensorError, ValueError) as exc:
        raise DecodeError(f"tensors do not decode: {exc}") from exc
    groups: dict[str, Arrays] = {}
    for key, value in flat.items():
        group, _, name = key.partition("/")
        if not name:
            raise DecodeError(f"tensor {key!r} has no group")
        groups.setdefault(group, {})[name] = value
    return groups
