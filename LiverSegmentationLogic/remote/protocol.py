"""The remote-inference wire format: a JSON header frame followed by raw array frames.

Request:  [header, buffer...] with header
    {"protocol": 1, "op": "info" | "segment" | "cancel" | "heartbeat" | "submit", "id": "...",
     "arrays": [{"name": "image", "dtype": "float32", "shape": [z, y, x],
                 "geometry": {"spacing": [...], "origin": [...], "direction": [...]},
                 "compression": "none" | "zlib"}],
     "options": {...}}
Reply:    [header, buffer...] with header
    {"protocol": 1, "id": "...", "status": "ok" | "error" | "cancelled" | "event", ...}

A multi-channel scan (one image per input channel of the model, e.g. in-phase + opposed-phase)
travels as arrays named "image", "image_1", "image_2"... in channel order.

Arrays travel as their raw bytes (C order, little-endian), never pickled. Every decoding step is
checked and fails with :class:`ProtocolError`, which the server turns into an error reply.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Sequence

import numpy as np

from ..errors import ProtocolError, ProtocolVersionError
from ..io.volumes import Geometry, Volume

PROTOCOL_VERSION = 1
#: protocol versions this build understands (a server advertises them in ``info``)
SUPPORTED_PROTOCOLS = (1,)
ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"}
COMPRESSIONS = ("none", "zlib")
OPS = ("info", "segment", "cancel", "heartbeat", "submit")
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB


def encode_array(name: str, array: np.ndarray, geometry: Geometry | None = None, compression: str = "none"):
    """-> (array descriptor for the header, buffer to send)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    dtype = array.dtype.name
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be sent; use one of {sorted(ALLOWED_DTYPES)}")
    desc = {"name": name, "dtype": dtype, "shape": list(array.shape), "compression": compression}
    if geometry is not None:
        desc["geometry"] = {
            "spacing": list(geometry.spacing),
            "origin": list(geometry.origin),
            "direction": list(geometry.direction),
        }
    buffer = zlib.compress(array.data, 1) if compression == "zlib" else memoryview(array).cast("B")
    return desc, buffer


def decode_array(desc: dict, buffer) -> tuple[np.ndarray, Geometry | None]:
    """Check a descriptor against its buffer and rebuild the array (a copy, writable)."""
    if not isinstance(desc, dict):
        raise ProtocolError("array descriptor must be a JSON object")
    dtype = desc.get("dtype")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"unsupported dtype {dtype!r}; allowed: {sorted(ALLOWED_DTYPES)}")
    shape = desc.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ProtocolError(f"shape must be a list of non-negative integers, got {shape!r}")
    compression = desc.get("compression", "none")
    if compression not in COMPRESSIONS:
        raise ProtocolError(f"unknown compression {compression!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    data = bytes(buffer)
    if compression == "zlib":
        try:
            decomp = zlib.decompressobj()
            data = decomp.decompress(data, expected + 1)  # never inflate past what the header claims
        except zlib.error as exc:
            raise ProtocolError(f"array {desc.get('name')!r}: corrupt zlib data ({exc})") from exc
    if len(data) != expected:
        raise ProtocolError(
            f"array {desc.get('name')!r}: buffer has {len(data)} bytes, shape {shape} of {dtype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()
    geometry = None
    if "geometry" in desc:
        g = desc["geometry"]
        try:
            geometry = Geometry(
                tuple(float(v) for v in g["spacing"]),
                tuple(float(v) for v in g["origin"]),
                tuple(float(v) for v in g["direction"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"array {desc.get('name')!r}: bad geometry ({exc})") from exc
        if len(geometry.spacing) != 3 or len(geometry.origin) != 3 or len(geometry.direction) != 9:
            raise ProtocolError(f"array {desc.get('name')!r}: geometry must be 3D")
    return array, geometry


def pack(header: dict, buffers: Sequence = ()) -> list:
    """Header dict + buffers -> frames to send."""
    return [json.dumps(header).encode()] + list(buffers)


def unpack(frames: Sequence, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[dict, list]:
    """Frames -> (header, buffers), checking size, JSON and the array frame count."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames[0]) > 1 << 20:
        raise ProtocolError(f"header frame of {len(frames[0])} bytes is larger than 1 MiB")
    try:
        header = json.loads(bytes(frames[0]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes", header.get("id"))
    arrays = header.get("arrays", [])
    if not isinstance(arrays, list):
        raise ProtocolError("'arrays' must be a list")
    if len(arrays) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(arrays)} arrays but {len(frames) - 1} buffer frames came")
    return header, list(frames[1:])


def check_request(header: dict) -> None:
    """Raise ProtocolVersionError for a version this build does not speak, ProtocolError unless
    the header is otherwise a well-formed request."""
    version = header.get("protocol")
    if version not in SUPPORTED_PROTOCOLS:
        raise ProtocolVersionError(
            f"protocol version {version!r} is not supported (server speaks {list(SUPPORTED_PROTOCOLS)}); "
            "upgrade the extension or the server so they match"
        )
    if header.get("op") not in OPS:
        raise ProtocolError(f"unknown op {header.get('op')!r}; known: {list(OPS)}")
    if not isinstance(header.get("id"), str) or not header["id"]:
        raise ProtocolError("request 'id' must be a non-empty string")


def volume_from(header: dict, buffers: list, name: str) -> Volume | None:
    """The named array of a request as a Volume (None if absent); geometry required."""
    for desc, buf in zip(header.get("arrays", []), buffers, strict=True):
        if isinstance(desc, dict) and desc.get("name") == name:
            array, geometry = decode_array(desc, buf)
            if geometry is None:
                raise ProtocolError(f"array {name!r} has no geometry")
            if array.ndim != 3:
                raise ProtocolError(f"array {name!r} must be 3D, got shape {list(array.shape)}")
            return Volume(array, geometry)
    return None


def channel_array_name(index: int) -> str:
    """The array name of input channel ``index``: "image" for the first, then "image_1"..."""
    return "image" if index == 0 else f"image_{index}"


def channel_volumes_from(header: dict, buffers: list) -> list[Volume]:
    """The request's input channels in order ("image", "image_1", ...); the segmenter checks that
    their number fits the model and that they share one grid."""
    names = [d.get("name") for d in header.get("arrays", []) if isinstance(d, dict)]
    sent = [n for n in names if isinstance(n, str) and re.fullmatch(r"image(_\d+)?", n)]
    expected = [channel_array_name(i) for i in range(len(sent))]
    if sorted(sent) != sorted(expected):
        raise ProtocolError(f"input channels must be named {expected} (one of each), got {sent}")
    return [volume_from(header, buffers, name) for name in expected]
