"""msgpack wire format for documents that carry numpy arrays, at memory speed.

A document is a msgpack map with str keys whose values are JSON-like data (None, bool,
int, float, str, list, map), bytes, or numpy arrays. An array travels as a map with exactly
the keys ``dtype`` (a string from :data:`DTYPES`), ``shape`` (a list of non-negative ints)
and ``data`` (a msgpack bin with the raw little-endian, C-order bytes). Every encoded
document is plain msgpack: ``msgpack.unpackb(data)`` reads it, arrays included (as maps).

Encoding (:func:`pack`) copies every payload exactly once: the document is built as a list
of pieces -- metadata from ``msgpack.packb``, a bin header per array, and a memoryview of
each (C-contiguous, little-endian) array -- and joined with ``b"".join``. The encoder pads
each payload to an 8-byte offset from the start of the document by choosing longer but
valid msgpack string forms (str8/str16/str32) for the array map's keys, so that a decoder
can return aligned arrays without copying.

Decoding (:func:`unpack`) does not use ``msgpack.unpackb``: that copies every bin into a
fresh ``bytes`` object, which at 40 MB costs ~4x a numpy copy (page faults on
non-huge-page memory) and alone misses the speed goal. Instead a small strict reader walks
the document and hands out bins as zero-copy memoryview slices of the input; arrays are
``np.frombuffer`` views of those. Therefore decoded arrays:

* are **read-only** (``flags.writeable`` is False) -- copy one before changing it;
* share memory with, and keep alive, the input buffer (a ``bytearray`` input stays
  locked against resizing while they live, and must not be modified);
* are copied only when the payload is misaligned in memory (a foreign encoder, or a
  buffer that starts at an odd address), so that numpy and BLAS stay on their fast paths.

The reader is strict where msgpack is lenient: map keys must be str and unique, ext types
and the reserved byte 0xc1 are refused, nesting is limited to :data:`MAX_DEPTH`, counts
may not exceed the bytes left, and no trailing bytes are allowed. Float arrays must be
finite. Every failure is a :class:`~shared.errors.DecodeError` that names the offending
item by its path, e.g. ``params["dense_0/W"]``.

A map whose key set is exactly ``{"dtype", "shape", "data"}`` and whose ``data`` is a bin
is always read as an array; that shape of map is reserved for arrays.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from fedmq.shared.errors import DecodeError

__all__ = [
    "all_finite",
    "ARRAY_KEYS",
    "DTYPES",
    "MAX_DEPTH",
    "MAX_NDIM",
    "decode_arrays",
    "encode_arrays",
    "pack",
    "unpack",
]

#: Wire names of the allowed dtypes (``np.dtype(name).str``), all little-endian.
DTYPES: frozenset[str] = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "|i1", "|u1", "<u2"})  # <u2: bfloat16 bits
#: The exact key set of an array map.
ARRAY_KEYS: frozenset[str] = frozenset({"dtype", "shape", "data"})
#: Deepest nesting of maps and lists that :func:`unpack` accepts.
MAX_DEPTH = 64
#: Most dimensions an array may have on the wire (numpy itself allows 64 in 2.x, 32 in 1.x).
MAX_NDIM = 32

_ALIGN = 8  # payload offset granularity; >= the largest itemsize in DTYPES
_FLOAT_BLOCK = 1 << 18  # elements per block in the finiteness check (stays in L2)
_MAX_BIN = 0xFFFFFFFF  # msgpack bin32 limit
_SPLIT_BYTES = 1 << 16  # float arrays this large get a 64-byte aligned dot (see _all_finite)


# --------------------------------------------------------------------------- encoding


def _container_header(n: int, fix: int, code16: int, code32: int, what: str) -> bytes:
    if n <= 15:
        return bytes((fix | n,))
    if n <= 0xFFFF:
        return struct.pack(">BH", code16, n)
    if n <= 0xFFFFFFFF:
        return struct.pack(">BI", code32, n)
    raise ValueError(f"{what} has {n} entries, more than msgpack allows (2**32 - 1)")


def _map_header(n: int, what: str) -> bytes:
    return _container_header(n, 0x80, 0xDE, 0xDF, what)


def _list_header(n: int, what: str) -> bytes:
    return _container_header(n, 0x90, 0xDC, 0xDD, what)


def _bin_header(n: int) -> bytes:
    if n <= 0xFF:
        return struct.pack(">BB", 0xC4, n)
    if n <= 0xFFFF:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


def _str_forms(s: str) -> dict[int, bytes]:
    """Encodings of a short str keyed by how many bytes longer than the minimal one they are."""
    raw = s.encode("utf-8")
    n = len(raw)
    assert n <= 31, "only for short keys"
    return {
        0: bytes((0xA0 | n,)) + raw,  # fixstr
        1: struct.pack(">BB", 0xD9, n) + raw,  # str8
        2: struct.pack(">BH", 0xDA, n) + raw,  # str16
        4: struct.pack(">BI", 0xDB, n) + raw,  # str32
    }


_KEY_FORMS = {key: _str_forms(key) for key in ("dtype", "shape", "data")}
# bytes of an array map before its payload, besides dtype, shape and the bin header
_ARRAY_MAP_MIN = 1 + sum(len(forms[0]) for forms in _KEY_FORMS.values())
# padding -> extra bytes for the keys (dtype, shape, data), each extra in {0, 1, 2, 4}
_PAD_PLAN: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0),
    1: (0, 0, 1),
    2: (0, 0, 2),
    3: (0, 1, 2),
    4: (0, 0, 4),
    5: (0, 1, 4),
    6: (0, 2, 4),
    7: (1, 2, 4),
}


def _wire_dtype(arr: np.ndarray, where: str) -> str:
    """The wire name for ``arr``'s dtype, or TypeError if it is not allowed."""
    name = arr.dtype.newbyteorder("<").str
    if name not in DTYPES or arr.dtype.fields is not None:
        raise TypeError(
            f"{where}: dtype {arr.dtype} is not supported on the wire; "
            f"use one of {', '.join(sorted(DTYPES))}"
        )
    return name


class _Packer:
    """Collects the pieces of one document and the offset where the next piece starts."""

    def __init__(self) -> None:
        self.pieces: list[Any] = []
        self.offset = 0

    def put(self, piece: Any) -> None:
        self.pieces.append(piece)
        self.offset += len(piece)

    def value(self, value: Any, where: str) -> None:
        if type(value) in _PLAIN:  # the common case, without the ABC checks below
            self.put(_pack_leaf(value, where))
        elif isinstance(value, np.ndarray):
            self.array(value, where)
        elif isinstance(value, Mapping):
            self.mapping(value, where)
        elif isinstance(value, (list, tuple)):
            self.put(_list_header(len(value), where))
            for i, item in enumerate(value):
                self.value(item, f"{where}[{i}]")
        else:
            self.put(_pack_leaf(value, where))

    def mapping(self, doc: Mapping[Any, Any], where: str) -> None:
        if type(doc) is dict and all(type(k) is str and type(v) in _PLAIN for k, v in doc.items()):
            # a map of plain values (a task, a control message, a spec's layer): msgpack's own
            # bytes for it are the ones the loop below puts together piece by piece, in one call
            try:
                self.put(msgpack.packb(doc))
                return
            except (OverflowError, ValueError):
                pass  # out of msgpack's range: the loop below raises, saying where
        self.put(_map_header(len(doc), where))
        for key, item in doc.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: map key {key!r} is a {type(key).__name__}, not a str")
            self.put(_pack_leaf(key, where))
            self.value(item, _child(where, key))

    def array(self, arr: np.ndarray, where: str) -> None:
        dtype = _wire_dtype(arr, where)
        flat = np.ascontiguousarray(arr, dtype=dtype).reshape(-1).view(np.uint8)
        if flat.nbytes > _MAX_BIN:
            raise ValueError(f"{where}: {flat.nbytes} bytes, more than a msgpack bin holds")
        meta = [msgpack.packb(dtype), msgpack.packb(list(arr.shape))]
        bin_header = _bin_header(flat.nbytes)
        unpadded = self.offset + _ARRAY_MAP_MIN + sum(map(len, meta)) + len(bin_header)
        extra = _PAD_PLAN[-unpadded % _ALIGN]
        self.put(b"\x83")
        self.put(_KEY_FORMS["dtype"][extra[0]])
        self.put(meta[0])
        self.put(_KEY_FORMS["shape"][extra[1]])
        self.put(meta[1])
        self.put(_KEY_FORMS["data"][extra[2]])
        self.put(bin_header)
        self.put(flat.data)


#: value types msgpack encodes as they are (exact types: a subclass takes the general path)
_PLAIN = frozenset({str, int, float, bool, type(None), bytes})


def _pack_leaf(value: Any, where: str) -> bytes:
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if not isinstance(value, (type(None), bool, int, float, str, bytes, bytearray)):
        raise TypeError(
            f"{where}: cannot encode a {type(value).__name__}; "
            "use None, bool, int, float, str, bytes, list, dict or a numpy array"
        )
    try:
        return msgpack.packb(value)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{where}: cannot encode {value!r}: {exc}") from exc


def _child(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}[{key!r}]" if where else key


def pack(doc: Mapping[str, Any]) -> bytes:
    """Encode a str-keyed map whose values may contain numpy arrays as one msgpack document.

    Lists and tuples become msgpack arrays, numpy scalars become Python scalars. Raises
    TypeError for a value, key or dtype that has no wire form (naming where it is), and
    ValueError for values out of msgpack's range. Does not check floats for finiteness.
    """
    if not isinstance(doc, Mapping):
        raise TypeError(f"the document must be a mapping, not a {type(doc).__name__}")
    packer = _Packer()
    packer.mapping(doc, "")
    return b"".join(packer.pieces)


def pack_pieces(doc: Mapping[str, Any]) -> list[Any]:
    """:func:`pack` without the final join: the document as a list of pieces (bytes, and
    zero-copy views of the arrays) whose concatenation is ``pack(doc)``. Lets a sender cut a large
    document into chunks without ever holding it in one buffer."""
    if not isinstance(doc, Mapping):
        raise TypeError(f"the document must be a mapping, not a {type(doc).__name__}")
    packer = _Packer()
    packer.mapping(doc, "")
    return packer.pieces


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode an ordered name -> array map as a msgpack map of array maps."""
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name!r} is a {type(arr).__name__}, not a numpy array")
    return pack(arrays)


# --------------------------------------------------------------------------- decoding


class _Bad(Exception):
    """Internal: what is wrong; ``path`` (innermost first) is filled in while unwinding."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str | int] = []

    def with_key(self, key: str | int) -> _Bad:
        self.path.append(key)
        return self

    def to_decode_error(self) -> DecodeError:
        where = ""
        for key in reversed(self.path):
            where = _child(where, key)
        return DecodeError(f"{where}: {self.what}" if where else self.what)


_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in (">B", ">H", ">I", ">Q"))
_I8, _I16, _I32, _I64 = (struct.Struct(f) for f in (">b", ">h", ">i", ">q"))
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")

# what follows a type byte: (_CONST, value) or (kind, struct of the number that follows)
_CONST, _NUMBER, _STR, _BIN, _LIST, _MAP = range(6)
_CODES: dict[int, tuple[int, Any]] = {
    0xC0: (_CONST, None),
    0xC2: (_CONST, False),
    0xC3: (_CONST, True),
    0xC4: (_BIN, _U8),
    0xC5: (_BIN, _U16),
    0xC6: (_BIN, _U32),
    0xCA: (_NUMBER, _F32),
    0xCB: (_NUMBER, _F64),
    0xCC: (_NUMBER, _U8),
    0xCD: (_NUMBER, _U16),
    0xCE: (_NUMBER, _U32),
    0xCF: (_NUMBER, _U64),
    0xD0: (_NUMBER, _I8),
    0xD1: (_NUMBER, _I16),
    0xD2: (_NUMBER, _I32),
    0xD3: (_NUMBER, _I64),
    0xD9: (_STR, _U8),
    0xDA: (_STR, _U16),
    0xDB: (_STR, _U32),
    0xDC: (_LIST, _U16),
    0xDD: (_LIST, _U32),
    0xDE: (_MAP, _U16),
    0xDF: (_MAP, _U32),
}
_CODE_NAMES = {0xC1: "reserved (never used)", **dict.fromkeys(range(0xC7, 0xCA), "ext")}
_CODE_NAMES.update(dict.fromkeys(range(0xD4, 0xD9), "ext"))

# The array fast path: byte forms of the keys that pack() may write, and of the dtypes.
_STR_HEADER_SIZE = {**dict.fromkeys(range(0xA0, 0xC0), 1), 0xD9: 2, 0xDA: 3, 0xDB: 5}
_DTYPE_KEY_AND_VALUE = {
    key + msgpack.packb(name): name for key in _KEY_FORMS["dtype"].values() for name in DTYPES
}
_SHAPE_KEYS = frozenset(_KEY_FORMS["shape"].values())
_DATA_KEYS = frozenset(_KEY_FORMS["data"].values())
_UINT_AFTER = {0xCC: _U8, 0xCD: _U16, 0xCE: _U32, 0xCF: _U64}
_BIN_AFTER = {0xC4: _U8, 0xC5: _U16, 0xC6: _U32}


class _Reader:
    """A strict msgpack reader over one buffer; bins come out as zero-copy memoryviews.

    Written for speed in plain Python: common one-byte forms are handled inline, an array
    map laid out the way :func:`pack` writes it is read by a straight-line fast path (any
    other layout takes the general path), and where an error is gets worked out only when
    one is raised.
    """

    __slots__ = ("data", "view", "pos", "end")

    def __init__(self, data: bytes | bytearray | memoryview, view: memoryview) -> None:
        self.data = data  # indexed and sliced for metadata
        self.view = view  # sliced for bins, without copying
        self.pos = 0
        self.end = len(view)

    def truncated(self, what: str, start: int, n: int) -> _Bad:
        return _Bad(
            f"truncated: {what} needs {n} bytes at offset {start}, only {self.end - start} left"
        )

    def value(self, depth: int) -> Any:
        data, pos = self.data, self.pos
        if pos >= self.end:
            raise _Bad(f"truncated: a value should start at offset {pos}, the end")
        code = data[pos]
        pos += 1
        self.pos = pos
        if code < 0x80:
            return code
        if code >= 0xE0:
            return code - 0x100
        if code < 0x90:
            return self.mapping(code & 0x0F, depth)
        if code < 0xA0:
            return self.sequence(code & 0x0F, depth)
        if code < 0xC0:
            return self.text(code & 0x1F)
        try:
            kind, arg = _CODES[code]
        except KeyError:
            what = _CODE_NAMES.get(code, "unknown")
            raise _Bad(
                f"unsupported msgpack type byte 0x{code:02x} ({what}) at offset {pos - 1}"
            ) from None
        if kind == _CONST:
            return arg
        if pos + arg.size > self.end:
            raise self.truncated("a number", pos, arg.size)
        number = arg.unpack_from(data, pos)[0]
        self.pos = pos + arg.size
        if kind == _NUMBER:
            return number
        if kind == _STR:
            return self.text(number)
        if kind == _BIN:
            return self.blob(number)
        if kind == _LIST:
            return self.sequence(number, depth)
        return self.mapping(number, depth)

    def text(self, n: int) -> str:
        start = self.pos
        end = start + n
        if end > self.end:
            raise self.truncated("a string", start, n)
        self.pos = end
        try:
            return str(self.data[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(f"the string at offset {start} is not valid UTF-8 ({exc.reason})") from None

    def blob(self, n: int) -> memoryview:
        start = self.pos
        if start + n > self.end:
            raise self.truncated("a bin", start, n)
        self.pos = start + n
        return self.view[start : start + n]

    def check_count(self, n: int, min_size: int, what: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise _Bad(f"nested deeper than {MAX_DEPTH} levels")
        if n * min_size > self.end - self.pos:
            raise _Bad(
                f"truncated: {what} of {n} entries cannot fit in the "
                f"{self.end - self.pos} bytes left"
            )

    def sequence(self, n: int, depth: int) -> list[Any]:
        self.check_count(n, 1, "a list", depth)
        value, depth = self.value, depth + 1
        items = []
        for i in range(n):
            try:
                item = value(depth)
            except _Bad as exc:
                exc.path.append(i)
                raise
            items.append(bytes(item) if type(item) is memoryview else item)
        return items

    def mapping(self, n: int, depth: int) -> Any:
        self.check_count(n, 2, "a map", depth)
        if n == 3:
            arr = self.packed_array()
            if arr is not None:
                return arr
        data, end, value, depth = self.data, self.end, self.value, depth + 1
        doc: dict[str, Any] = {}
        has_bin = False
        for _ in range(n):
            pos = self.pos
            code = data[pos] if pos < end else 0
            stop = pos + 1 + (code & 0x1F)
            if 0xA0 <= code < 0xC0 and stop <= end:  # fixstr, nearly every key
                self.pos = stop
                try:
                    key = str(data[pos + 1 : stop], "utf-8")
                except UnicodeDecodeError as exc:
                    raise _Bad(
                        f"the key at offset {pos + 1} is not valid UTF-8 ({exc.reason})"
                    ) from None
            else:
                key = value(depth)
                if type(key) is not str:
                    raise _Bad(f"the map key at offset {pos} is a {_kind(key)}, not a str")
            if key in doc:
                raise _Bad(f"duplicate map key {_brief(key)}")
            pos = self.pos
            code = data[pos] if pos < end else 0xC1
            if code < 0x80:  # the most common values, read inline: positive fixint,
                self.pos = pos + 1
                doc[key] = code
                continue
            if code == 0xCB and pos + 9 <= end:  # float64,
                self.pos = pos + 9
                doc[key] = _F64.unpack_from(data, pos + 1)[0]
                continue
            if code == 0x83 and depth < MAX_DEPTH:  # maybe an array map as pack() writes it
                self.pos = pos + 1
                try:
                    arr = self.packed_array()
                except _Bad as exc:
                    exc.path.append(key)
                    raise
                if arr is not None:
                    doc[key] = arr
                    continue
                self.pos = pos
            stop = pos + 1 + (code & 0x1F)
            if 0xA0 <= code < 0xC0 and stop <= end:  # and fixstr
                self.pos = stop
                try:
                    doc[key] = str(data[pos + 1 : stop], "utf-8")
                    continue
                except UnicodeDecodeError as exc:
                    raise _Bad(
                        f"the string at offset {pos + 1} is not valid UTF-8 ({exc.reason})"
                    ).with_key(key) from None
            try:
                item = doc[key] = value(depth)
            except _Bad as exc:
                exc.path.append(key)
                raise
            if type(item) is memoryview:
                has_bin = True
        if has_bin:
            if n == 3 and type(doc.get("data")) is memoryview and doc.keys() == ARRAY_KEYS:
                return _to_array(doc["dtype"], doc["shape"], doc["data"])
            for key, item in doc.items():
                if type(item) is memoryview:
                    doc[key] = bytes(item)
        return doc

    # -- the fast path for arrays as pack() writes them

    def packed_array(self) -> np.ndarray | None:
        """Read the rest of an array map written by pack(), or return None and move nothing.

        Only accepts the exact layout pack() produces (keys dtype, shape, data in this
        order, shape dimensions as unsigned ints); the general path handles the rest.
        """
        data, end, pos = self.data, self.end, self.pos
        if end - pos < 40:  # a packed array map is longer; leave short ones to the general path
            return None
        size = _STR_HEADER_SIZE.get(data[pos], 0) + 5  # "dtype" and its value
        found = _DTYPE_KEY_AND_VALUE.get(bytes(data[pos : pos + size + 4]))
        if found is None:
            return None
        pos += size + 4
        size = _STR_HEADER_SIZE.get(data[pos], 0) + 5
        if bytes(data[pos : pos + size]) not in _SHAPE_KEYS:
            return None
        pos += size
        code = data[pos]
        if not 0x90 <= code <= 0x9F:
            return None
        shape = []
        pos += 1
        for _ in range(code & 0x0F):
            code = data[pos] if pos < end else 0xC0
            pos += 1
            if code < 0x80:
                shape.append(code)
                continue
            fmt = _UINT_AFTER.get(code)
            if fmt is None or pos + fmt.size > end:
                return None
            shape.append(fmt.unpack_from(data, pos)[0])
            pos += fmt.size
        size = _STR_HEADER_SIZE.get(data[pos], 0) + 4 if pos < end else 0
        if bytes(data[pos : pos + size]) not in _DATA_KEYS:
            return None
        pos += size
        fmt = _BIN_AFTER.get(data[pos]) if pos < end else None
        if fmt is None or pos + 1 + fmt.size > end:
            return None
        self.pos = pos + 1 + fmt.size
        return _to_array(found, shape, self.blob(fmt.unpack_from(data, pos + 1)[0]))


def _kind(value: Any) -> str:
    """A short, user-facing name for the type of a decoded value."""
    if isinstance(value, np.ndarray):
        return "array"
    if isinstance(value, memoryview):
        return "bytes"
    return {dict: "map", list: "list", type(None): "nil"}.get(type(value), type(value).__name__)


def _brief(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_DTYPE_OBJECTS: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPES}


def _element_count(shape: Any) -> int:
    """prod(shape) for a valid wire shape, else _Bad."""
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise _Bad(
            f"the shape must be a list of at most {MAX_NDIM} non-negative ints, "
            f"got {_kind(shape)} {_brief(shape)}"
        )
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise _Bad(f"the shape {_brief(shape)} has {_brief(dim)}, not a non-negative int")
        count *= dim
    return count


def _to_array(name: Any, shape: Any, data: memoryview) -> np.ndarray:
    """The read-only array an array map describes, or _Bad naming what does not fit."""
    dtype = _DTYPE_OBJECTS.get(name) if type(name) is str else None
    if dtype is None:
        raise _Bad(f"dtype {_brief(name)} is not allowed; allowed: {', '.join(sorted(DTYPES))}")
    count = _element_count(shape)
    if count * dtype.itemsize != len(data):
        raise _Bad(
            f"{len(data)} data bytes, but shape {shape} of {name} needs {count * dtype.itemsize}"
        )
    flat = np.frombuffer(data, dtype, count)
    if not flat.flags.aligned:
        flat = flat.copy()
    if dtype.kind == "f" and not _all_finite(flat):
        raise _Bad(f"the {name} array contains NaN or infinity")
    if flat.flags.writeable:
        flat.flags.writeable = False
    if len(shape) == 1:
        return flat
    try:
        return flat.reshape(shape)
    except (ValueError, OverflowError) as exc:  # a zero-size shape with a dimension beyond intp
        raise _Bad(f"the shape {shape} is not a valid numpy shape: {exc}") from None


def all_finite(arr: np.ndarray) -> bool:
    """True iff no element of the float array ``arr`` (any shape) is NaN or infinite; the fast
    check the decoder uses (see :func:`_all_finite`), for code that checks arrays it did not decode."""
    flat = arr.reshape(-1)  # a view where arr is contiguous (the usual case), else a copy
    with np.errstate(over="ignore", invalid="ignore"):
        return _all_finite(flat)


def _all_finite(flat: np.ndarray) -> bool:
    """True iff no element of the 1-d float array ``flat`` is NaN or infinite.

    float32/float64: a finite ``dot(a, a)`` proves every element finite (NaN and inf
    propagate into a sum of squares, and no term can cancel them); only when it is not
    finite -- non-finite input, or finite values whose squares overflow -- is the exact
    blockwise ``isfinite`` needed. BLAS ``dot`` reads memory at up to ~1.8x the speed of
    ``isfinite(a).all()`` and needs no temporary. Callers must mask the overflow/invalid
    warnings. float16 checks the exponent bits, since numpy's float16 ``isfinite`` and
    ``dot`` are ~20x slower.
    """
    if flat.dtype.itemsize == 2:
        return _half_finite(flat.view(np.uint16))
    if flat.nbytes >= _SPLIT_BYTES:
        # BLAS dot is ~1.4x faster on 64-byte aligned data, which the encoder cannot
        # arrange (it does not know where the receiver's buffer starts): split off the head.
        head = (-flat.ctypes.data % 64) // flat.itemsize
        body, start = flat[head:], flat[:head]
        squares = body.dot(body) + start.dot(start)
    else:
        squares = flat.dot(flat)
    if math.isfinite(squares):
        return True
    ok = np.empty(min(flat.size, _FLOAT_BLOCK), dtype=bool)
    for i in range(0, flat.size, _FLOAT_BLOCK):
        out = ok[: min(_FLOAT_BLOCK, flat.size - i)]
        np.isfinite(flat[i : i + _FLOAT_BLOCK], out=out)
        if not out.all():
            return False
    return True


def _half_finite(bits: np.ndarray) -> bool:
    tmp = np.empty(min(bits.size, _FLOAT_BLOCK), dtype=np.uint16)
    for i in range(0, bits.size, _FLOAT_BLOCK):
        out = tmp[: min(_FLOAT_BLOCK, bits.size - i)]
        np.bitwise_and(bits[i : i + _FLOAT_BLOCK], 0x7FFF, out=out)
        if out.max() >= 0x7C00:  # exponent all ones: inf or NaN
            return False
    return True


def _as_bytes_view(data: Any) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, bytearray or memoryview, got {type(data).__name__}")
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError as exc:
            raise DecodeError(f"the message buffer is not contiguous: {exc}") from None
    return view


def unpack(data: bytes | bytearray | memoryview, max_bytes: int) -> dict[str, Any]:
    """Decode one msgpack document whose top level is a map, turning array maps into arrays.

    ``len(data)`` is checked against ``max_bytes`` before anything is parsed. Arrays are
    read-only views into ``data`` (see the module docstring); bins that are not array
    payloads come out as ``bytes``. Raises only :class:`DecodeError`.
    """
    view = _as_bytes_view(data)
    if view.nbytes > max_bytes:
        raise DecodeError(f"the message is {view.nbytes} bytes, over the limit of {max_bytes}")
    if view.nbytes == 0:
        raise DecodeError("the message is empty, not msgpack")
    reader = _Reader(data if isinstance(data, (bytes, bytearray)) else view, view)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            doc = reader.value(0)
    except _Bad as exc:
        raise exc.to_decode_error() from None
    except (
        struct.error,
        ValueError,
        TypeError,
        OverflowError,
        IndexError,
        MemoryError,
        RecursionError,
    ) as exc:  # a safety net: the reader checks everything it knows of before it happens
        raise DecodeError(f"malformed msgpack near offset {reader.pos}: {exc!r}") from exc
    if reader.pos != reader.end:
        raise DecodeError(
            f"{reader.end - reader.pos} trailing bytes after the msgpack document "
            f"(it ends at offset {reader.pos})"
        )
    if type(doc) is not dict:
        raise DecodeError(f"the top level must be a map, got {_kind(doc)} {_brief(doc, 40)}")
    return doc


def decode_arrays(data: bytes | bytearray | memoryview, max_bytes: int) -> dict[str, np.ndarray]:
    """Decode the output of :func:`encode_arrays`: an ordered name -> read-only array map."""
    doc = unpack(data, max_bytes)
    for name, value in doc.items():
        if not isinstance(value, np.ndarray):
            raise DecodeError(f"{name!r} is a {_kind(value)}, not an array map")
    return doc
