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
checked, with limits on sizes, JSON depth, number lengths and shapes checked before anything is
allocated, and fails with :class:`ProtocolError`, which the server turns into an error reply.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidImageError, ProtocolError, ProtocolVersionError
from ..io.volumes import Geometry, Volume, validate_geometry

PROTOCOL_VERSION = 1
#: protocol versions this build understands (a server advertises them in ``info``)
SUPPORTED_PROTOCOLS = (1,)
ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"}
COMPRESSIONS = ("none", "zlib")
FF_UNITS = ("auto", "percent", "fraction")
OPS = ("info", "segment", "cancel", "heartbeat", "submit",
       "models", "train", "train_status", "train_cancel", "activate", "rollback")
#: ops that change what the server's models are: only trainers (a separate key folder) may send them
TRAINER_OPS = ("train", "train_cancel", "activate", "rollback")
MAX_TRAIN_BUDGET_S = 4 * 3600
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB
# limits checked before anything is allocated
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 8  # a request header needs 5 (header > arrays > descriptor > geometry > spacing)
MAX_INT_DIGITS = 20
MAX_ARRAYS = 8
MAX_AXIS = 4096  # voxels along one array axis
MAX_NAME_CHARS = 128
MAX_MARGIN_MM = 50.0


# --------------------------------------------------------------------------------------- JSON
def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(f"integer of {len(text)} digits in the header (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str):
    raise ProtocolError(f"{name} is not allowed in a header")


def _check_depth(value) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"header nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def loads_header(data) -> dict:
    """A header frame -> dict, bounded in size, depth and number length (never a crash: any
    failure is a :class:`ProtocolError`)."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(data)} bytes is larger than {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(bytes(data).decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 errors
        raise ProtocolError(f"header is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    _check_depth(header)
    return header


# --------------------------------------------------------------------------------------- arrays
def encode_array(name: str, array: np.ndarray, geometry: Optional[Geometry] = None, compression: str = "none"):
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value, count: int, what: str) -> tuple:
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ProtocolError(f"{what} must be a list of {count} numbers")
    return tuple(float(v) for v in value)


def check_descriptor(desc, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple:
    """Every field of an array descriptor, checked without touching its buffer.

    Returns:
        (name, numpy dtype, shape, Geometry or None); the decoded size is at most ``max_bytes``.
    """
    if not isinstance(desc, dict):
        raise ProtocolError("array descriptor must be a JSON object")
    name = desc.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]{1,64}", name):
        raise ProtocolError(f"array name must be 1-64 letters, digits or '_', got {name!r:.80}")
    dtype = desc.get("dtype")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"array {name!r}: unsupported dtype {dtype!r:.80}; allowed: {sorted(ALLOWED_DTYPES)}")
    shape = desc.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(_is_int(s) for s in shape):
        raise ProtocolError(f"array {name!r}: shape must be a list of 1-4 integers, got {shape!r:.80}")
    if not all(1 <= s <= MAX_AXIS for s in shape):
        raise ProtocolError(f"array {name!r}: every axis must hold 1-{MAX_AXIS} voxels, got {shape}")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > max_bytes:
        raise ProtocolError(f"array {name!r}: {nbytes} bytes decoded exceed the limit of {max_bytes} bytes")
    if desc.get("compression", "none") not in COMPRESSIONS:
        raise ProtocolError(f"array {name!r}: unknown compression {desc.get('compression')!r:.80}")
    geometry = None
    if "geometry" in desc:
        g = desc["geometry"]
        if not isinstance(g, dict):
            raise ProtocolError(f"array {name!r}: geometry must be a JSON object")
        geometry = Geometry(_numbers(g.get("spacing"), 3, f"array {name!r}: geometry.spacing"),
                            _numbers(g.get("origin"), 3, f"array {name!r}: geometry.origin"),
                            _numbers(g.get("direction"), 9, f"array {name!r}: geometry.direction"))
        try:
            validate_geometry(geometry, f"array {name!r}")
        except InvalidImageError as exc:
            raise ProtocolError(str(exc)) from None
    return name, np.dtype(dtype), shape, geometry


def decode_array(desc: dict, buffer, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple:
    """Check a descriptor against its buffer and rebuild the array (a copy, writable): (array, Geometry or None)."""
    name, dtype, shape, geometry = check_descriptor(desc, max_bytes)
    expected = math.prod(shape) * dtype.itemsize
    if desc.get("compression", "none") == "zlib":
        try:
            decomp = zlib.decompressobj()
            data = decomp.decompress(buffer, expected + 1)  # never inflate past what the header claims
        except zlib.error as exc:
            raise ProtocolError(f"array {name!r}: corrupt zlib data ({exc})") from exc
    else:
        data = buffer
    if len(data) != expected:
        raise ProtocolError(f"array {name!r}: buffer has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape).copy()
    return array, geometry


# --------------------------------------------------------------------------------------- messages
def pack(header: dict, buffers: Sequence = ()) -> list:
    """Header dict + buffers -> frames to send."""
    return [json.dumps(header).encode()] + list(buffers)


def unpack(frames: Sequence, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[dict, list]:
    """Frames -> (header, buffers), checking size, JSON and the array frame count."""
    if not frames:
        raise ProtocolError("empty message")
    header = loads_header(frames[0])
    total = sum(len(f) for f in frames)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes", header.get("id"))
    arrays = header.get("arrays", [])
    if not isinstance(arrays, list):
        raise ProtocolError("'arrays' must be a list")
    if len(arrays) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(arrays)} arrays but {len(frames) - 1} buffer frames came")
    return header, list(frames[1:])


def request_id_of(header: dict) -> Optional[str]:
    """The request id if it is a usable one (for error replies), else None."""
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_NAME_CHARS else None


def check_request(header: dict, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
    """Raise ProtocolVersionError for a version this build does not speak, ProtocolError unless
    every field the server reads is well-formed (array descriptors and geometry included)."""
    version = header.get("protocol")
    if not _is_int(version) or version not in SUPPORTED_PROTOCOLS:
        raise ProtocolVersionError(
            f"protocol version {version!r:.40} is not supported (server speaks {list(SUPPORTED_PROTOCOLS)}); "
            "upgrade the extension or the server so they match"
        )
    op = header.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown op {op!r:.40}; known: {list(OPS)}")
    if request_id_of(header) is None:
        raise ProtocolError(f"request 'id' must be a string of 1-{MAX_NAME_CHARS} characters")
    if op in ("cancel", "heartbeat"):
        target = header.get("target")
        if not isinstance(target, str) or not 0 < len(target) <= MAX_NAME_CHARS:
            raise ProtocolError(f"'{op}' needs a 'target' request id (a string of 1-{MAX_NAME_CHARS} characters)")
    if not isinstance(header.get("options", {}), dict):
        raise ProtocolError("'options' must be a JSON object")
    session = header.get("session")
    if session is not None and not (isinstance(session, str) and 0 < len(session) <= MAX_NAME_CHARS):
        raise ProtocolError(f"'session' must be a string of 1-{MAX_NAME_CHARS} characters")
    arrays = header.get("arrays", [])
    if not isinstance(arrays, list) or len(arrays) > MAX_ARRAYS:
        raise ProtocolError(f"'arrays' must be a list of at most {MAX_ARRAYS} descriptors")
    names = [check_descriptor(desc, max_bytes)[0] for desc in arrays]
    if len(set(names)) != len(names):
        raise ProtocolError(f"array names must be distinct, got {names}")


def segment_options(options: dict) -> dict:
    """The options of a segment request, checked: margin_mm, ff_unit, label_compression, study."""
    margin = options.get("margin_mm", 3.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin <= MAX_MARGIN_MM:
        raise ProtocolError(f"options.margin_mm must be a number from 0 to {MAX_MARGIN_MM:g}, got {margin!r:.40}")
    ff_unit = options.get("ff_unit", "auto")
    if not isinstance(ff_unit, str) or ff_unit not in FF_UNITS:
        raise ProtocolError(f"options.ff_unit must be one of {list(FF_UNITS)}, got {ff_unit!r:.40}")
    compression = options.get("label_compression", "zlib")
    if not isinstance(compression, str) or compression not in COMPRESSIONS:
        raise ProtocolError(f"options.label_compression must be one of {list(COMPRESSIONS)}, got {compression!r:.40}")
    study = options.get("study")
    if study is not None and not (isinstance(study, str) and 0 < len(study) <= MAX_NAME_CHARS):
        raise ProtocolError(f"options.study must be a string of 1-{MAX_NAME_CHARS} characters")
    return {"margin_mm": float(margin), "ff_unit": ff_unit, "label_compression": compression, "study": study}


def submit_options(options: dict) -> dict:
    """The options of a submit request, checked for type: meta (an object whose study, operator,
    modality and task are strings), labels (an object or null), on_duplicate. The queue checks
    their content against itself."""
    meta = options.get("meta") or {}
    if not isinstance(meta, dict):
        raise ProtocolError("options.meta must be a JSON object")
    for key in ("study", "operator", "modality", "task"):
        if key in meta and not (isinstance(meta[key], str) and len(meta[key]) <= 256):
            raise ProtocolError(f"options.meta.{key} must be a string of at most 256 characters")
    labels = options.get("labels")
    if labels is not None and not isinstance(labels, dict):
        raise ProtocolError("options.labels must be a JSON object of name -> label value")
    on_duplicate = options.get("on_duplicate", "replace")
    if on_duplicate not in ("replace", "version"):
        raise ProtocolError(f"options.on_duplicate must be 'replace' or 'version', got {on_duplicate!r:.40}")
    return {"meta": meta, "labels": labels, "on_duplicate": on_duplicate}


def _optional_name(options: dict, key: str) -> Optional[str]:
    value = options.get(key)
    if value is not None and not (isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS):
        raise ProtocolError(f"options.{key} must be a string of 1-{MAX_NAME_CHARS} characters")
    return value


def model_options(options: dict) -> dict:
    """The options of the model ops (models, train, activate, rollback), checked: ``model`` (a name,
    or name@version for activate), ``study``, ``time_budget_s`` (train)."""
    budget = options.get("time_budget_s", 300.0)
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 10 <= budget <= MAX_TRAIN_BUDGET_S:
        raise ProtocolError(f"options.time_budget_s must be a number of seconds from 10 to {MAX_TRAIN_BUDGET_S}")
    return {"model": _optional_name(options, "model"), "study": _optional_name(options, "study"),
            "time_budget_s": float(budget)}


def volume_from(header: dict, buffers: list, name: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Optional[Volume]:
    """The named array of a request as a Volume (None if absent); geometry required."""
    for desc, buf in zip(header.get("arrays", []), buffers):  # unpack() checked: one buffer per descriptor
        if isinstance(desc, dict) and desc.get("name") == name:
            array, geometry = decode_array(desc, buf, max_bytes)
            if geometry is None:
                raise ProtocolError(f"array {name!r} has no geometry")
            if array.ndim != 3:
                raise ProtocolError(f"array {name!r} must be 3D, got shape {list(array.shape)}")
            return Volume(array, geometry)
    return None


def channel_array_name(index: int) -> str:
    """The array name of input channel ``index``: "image" for the first, then "image_1"..."""
    return "image" if index == 0 else f"image_{index}"


def channel_volumes_from(header: dict, buffers: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[Volume]:
    """The request's input channels in order ("image", "image_1", ...); the segmenter checks that
    their number fits the model and that they share one grid."""
    names = [d.get("name") for d in header.get("arrays", []) if isinstance(d, dict)]
    sent = [n for n in names if isinstance(n, str) and re.fullmatch(r"image(_\d+)?", n)]
    expected = [channel_array_name(i) for i in range(len(sent))]
    if sorted(sent) != sorted(expected):
        raise ProtocolError(f"input channels must be named {expected} (one of each), got {sent}")
    return [volume_from(header, buffers, name, max_bytes) for name in expected]
