"""Torch-free verification of a `model.safetensors` file: structure and finite values.

The registry runs it before offering a model, so a truncated, overwritten or
NaN-filled weights file is reported unavailable instead of being chosen for requests
that only name a channel set. It reads the safetensors header (8-byte little-endian
length, then JSON: name → dtype, shape, data_offsets) and checks that the tensors tile
the data region exactly; then it scans every float tensor for NaN/inf through a
chunked reads, so it costs about one read of the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np

# safetensors dtype → (bytes per element, numpy view used to find NaN/inf, exponent mask)
_DTYPES: dict[str, tuple[int, str | None, int]] = {
    "BOOL": (1, None, 0), "U8": (1, None, 0), "I8": (1, None, 0),
    "F8_E5M2": (1, "<u1", 0x7C), "F8_E4M3": (1, None, 0),
    "I16": (2, None, 0), "U16": (2, None, 0), "F16": (2, "<u2", 0x7C00), "BF16": (2, "<u2", 0x7F80),
    "I32": (4, None, 0), "U32": (4, None, 0), "F32": (4, "<u4", 0x7F800000),
    "I64": (8, None, 0), "U64": (8, None, 0), "F64": (8, "<u8", 0x7FF0000000000000),
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
CHUNK_BYTES = 16 << 20


class WeightsError(ValueError):
    """Weights that cannot be served (one-line reason, naming no server path)."""


def verify_safetensors(path: Path) -> int:
    """Raise WeightsError unless `path` is a complete safetensors file of finite tensors;
    returns the number of tensors."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise WeightsError(f"{name} is truncated ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise WeightsError(
                    f"{name} is corrupt or truncated (its header claims {header_len} bytes, "
                    f"the file has {size - 8} after the length field)"
                )
            raw = f.read(header_len)
            header = _parse_header(name, raw)
            data_len = size - 8 - header_len
            spans = _check_entries(name, header)
            covered = _check_tiling(name, spans, data_len)
            if covered and data_len:
                _check_finite(name, header, f, 8 + header_len)
    except OSError as e:
        raise WeightsError(f"{name} cannot be read ({e.strerror or type(e).__name__})") from None
    return len(spans)


def _parse_header(name: str, raw: bytes) -> dict[str, dict[str, object]]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WeightsError(f"{name} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{name} is corrupt (its header is not a JSON object)")
    header.pop("__metadata__", None)
    if not header:
        raise WeightsError(f"{name} holds no tensors")
    return header


def _check_entries(name: str, header: dict[str, dict[str, object]]) -> list[tuple[int, int, str]]:
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise WeightsError(f"{name} is corrupt (tensor {key[:60]!r} has no description)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise WeightsError(f"{name} is corrupt (tensor {key[:60]!r} has an unknown dtype)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WeightsError(f"{name} is corrupt (tensor {key[:60]!r} has an invalid shape)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise WeightsError(f"{name} is corrupt (tensor {key[:60]!r} has invalid data offsets)")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPES[str(dtype)][0]:
            raise WeightsError(f"{name} is corrupt (tensor {key[:60]!r}: its size does not match its shape)")
        spans.append((begin, end, key))
    return sorted(spans)


def _check_tiling(name: str, spans: list[tuple[int, int, str]], data_len: int) -> bool:
    position = 0
    for begin, end, key in spans:
        if begin != position:
            raise WeightsError(f"{name} is corrupt (tensor data overlaps or leaves gaps at {key[:60]!r})")
        position = end
    if position > data_len:
        raise WeightsError(
            f"{name} is truncated (its tensors need {position} bytes of data, the file holds {data_len})"
        )
    if position < data_len:
        raise WeightsError(f"{name} is corrupt ({data_len - position} bytes follow the last tensor)")
    return True


def _check_finite(name: str, header: dict[str, dict[str, object]], f: BinaryIO, base: int) -> None:
    for key, entry in header.items():
        itemsize, view, mask = _DTYPES[str(entry["dtype"])]
        begin, end = cast(list[int], entry["data_offsets"])
        if view is None:
            continue
        f.seek(base + begin)
        remaining = end - begin
        while remaining > 0:
            chunk = f.read(min(remaining, CHUNK_BYTES - CHUNK_BYTES % itemsize))
            if not chunk:
                raise WeightsError(f"{name} is truncated (tensor {key[:60]!r} ends early)")
            remaining -= len(chunk)
            bits = np.frombuffer(chunk, dtype=view)
            exponent = np.asarray(mask, dtype=bits.dtype)
            if np.any((bits & exponent) == exponent):
                raise WeightsError(f"{name} is corrupt (tensor {key[:60]!r} holds NaN or infinite values)")
