"""Update compression: lossy wire forms of a delta, their strict decoder, and error feedback.

A run compresses its updates with one scheme (``--compress``), named in every task and update
as a canonical string (:func:`parse`, :attr:`Scheme.text`):

* ``none``: float32 arrays, as always.
* ``fp16``: each layer cast to float16: ``{"values": <f2 array of the layer's shape>}``. Relative
  error ≤ 2**-11 for normal values; a delta beyond float16's range (65504) cannot be sent.
* ``int8``: symmetric quantisation with one float32 scale per block of :data:`INT8_BLOCK`
  consecutive elements (C order): ``{"q": |i1 array of the layer's shape, "scale": <f4 [blocks],
  "block": int}``, value = q · scale, q in [-127, 127] (-128 is never produced and refused).
  Per block rather than per tensor: one outlier then coarsens only its block's 1024 values, at
  4/1024 bytes per element. Error ≤ scale/2 per element.
* ``topk:F``: per layer the ⌈F·n⌉ entries of largest magnitude: ``{"shape": [dims], "indices":
  <i4 or <i8 [k] strictly increasing, "values": <f4 [k]}``; the rest are zero. F in (0, 0.5]: at
  one half the indices and values already weigh as much as the dense layer.

Compression applies to deltas (new − base): a delta's entries are small and centred, and a
dropped entry means "unchanged". Top-k keeps what it does not send as the worker's *residual*
(:class:`ErrorFeedback`, Stich et al. 2018; Karimireddy et al. 2019): it is added to the next
delta, so no part of an update is lost for good, only delayed. fp16 and int8 need none (their
error is a rounding, not a dropped entry).

:func:`decode_params` is the strict decoder of compressed layers: every layer must have exactly
its scheme's keys with the exact dtypes, consistent lengths, finite values, non-negative scales
that cannot overflow, int8 values in range, top-k indices in range and strictly increasing, and
the whole update may not decompress to more than a given limit (the aggregator: its model's size). It raises only
:class:`~fedmq.shared.errors.DecodeError`, naming the layer; every array it returns is a fresh,
writable float32 array (one update at a time, decompressed where it is validated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.shared import codec, lanes
from fedmq.shared.errors import DecodeError

__all__ = [
    "BFLOAT16",
    "INT8",
    "INT8_BLOCK",
    "MODEL_DTYPES",
    "NONE",
    "SCHEMES",
    "ErrorFeedback",
    "Scheme",
    "decode_params",
    "decompress",
    "deltas",
    "encode_params",
    "from_bfloat16",
    "model_params",
    "model_wire",
    "parse",
    "to_bfloat16",
    "topk_count",
]

SCHEMES = ("none", "fp16", "int8", "topk")
#: how a model version's parameters travel (``--model-dtype``): float32, bfloat16 or int8 (see below)
BFLOAT16 = "bfloat16"
INT8 = "int8"
MODEL_DTYPES = ("float32", BFLOAT16, INT8)
#: elements per int8 scale
INT8_BLOCK = 1024
#: the largest top-k fraction (at 0.5 indices and values weigh as much as the dense layer)
MAX_TOPK_FRACTION = 0.5
_CHUNK_BLOCKS = 256  # int8 blocks quantised at a time (1 MiB of float32 scratch)

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("|i1")
_INDEX_DTYPES = (np.dtype("<i4"), np.dtype("<i8"))
_MAX_SCALE = float(np.finfo(np.float32).max) / 127.0  # a larger scale overflows q * scale
_MAX_NDIM = 32
_KEYS = {
    "fp16": frozenset({"values"}),
    "int8": frozenset({"q", "scale", "block"}),
    "topk": frozenset({"shape", "indices", "values"}),
}


@dataclass(frozen=True)
class Scheme:
    """A compression scheme: its name and, for top-k, the fraction of entries kept."""

    name: str = "none"
    fraction: float | None = None

    @property
    def text(self) -> str:
        """The canonical wire and command-line form, e.g. ``int8`` or ``topk:0.1``."""
        return f"topk:{self.fraction!r}" if self.name == "topk" else self.name

    @property
    def lossy(self) -> bool:
        return self.name != "none"


NONE = Scheme()


def parse(text: str) -> Scheme:
    """The scheme ``text`` names (``none``, ``fp16``, ``int8`` or ``topk:F``); ValueError with what
    to write instead."""
    if not isinstance(text, str):
        raise ValueError(f"a compression scheme is a str, not {type(text).__name__}")
    name, colon, arg = text.strip().partition(":")
    if name == "topk":
        try:
            fraction = float(arg)
        except ValueError:
            fraction = math.nan
        if not 0.0 < fraction <= MAX_TOPK_FRACTION:
            raise ValueError(f"topk needs a fraction in (0, {MAX_TOPK_FRACTION}], e.g. topk:0.1; got {text!r}")
        return Scheme("topk", fraction)
    if name in SCHEMES and not colon:
        return Scheme(name)
    raise ValueError(f"unknown compression {text!r}; choose none, fp16, int8 or topk:FRACTION (e.g. topk:0.1)")


def topk_count(size: int, fraction: float) -> int:
    """How many entries top-k keeps of a layer of ``size``: ⌈fraction·size⌉, at least one."""
    return min(size, max(1, math.ceil(fraction * size)))


# ------------------------------------------------------------------ encoding (the worker)


def _int8(x: np.ndarray, base: np.ndarray | None = None) -> dict[str, Any]:
    """Quantise ``x`` (or ``x - base``: the delta is formed block by block, never as a whole
    array) :data:`_CHUNK_BLOCKS` blocks at a time through scratch buffers: no model-sized
    temporaries (at 10M parameters, 2x faster than whole-array numpy; with ``base``, a further
    ~1.5x over subtracting first). A large array's runs of blocks are dealt to the lanes
    (:mod:`fedmq.shared.lanes`). The bits are those of quantising ``np.subtract(x, base)``."""
    flat = x.reshape(-1)
    origin = None if base is None else base.reshape(-1)
    n = flat.size
    blocks, full = -(-n // INT8_BLOCK), n // INT8_BLOCK
    q = np.empty(n, np.int8)
    scale = np.empty(blocks, np.float32)
    # runs of _CHUNK_BLOCKS whole blocks, then the last, partial block: (first value, end, first block, end)
    runs = [(first * INT8_BLOCK, min(full, first + _CHUNK_BLOCKS) * INT8_BLOCK, first, min(full, first + _CHUNK_BLOCKS))
            for first in range(0, full, _CHUNK_BLOCKS)]
    if full < blocks:
        runs.append((full * INT8_BLOCK, n, full, blocks))
    width = min(n, _CHUNK_BLOCKS * INT8_BLOCK)

    def lane(k: int, step: int) -> None:
        scratch = np.empty(width, np.float32)
        diff = None if origin is None else np.empty_like(scratch)
        for lo, hi, first, last in runs[k::step]:
            scales = scale[first:last]
            rows = flat[lo:hi].reshape(scales.size, -1)
            if origin is not None and diff is not None:
                rows = np.subtract(rows, origin[lo:hi].reshape(rows.shape), out=diff[: hi - lo].reshape(rows.shape))
            buf = scratch[: hi - lo].reshape(rows.shape)
            np.abs(rows, out=buf)
            np.max(buf, axis=1, out=scales)
            scales /= np.float32(127.0)
            with np.errstate(over="ignore"):
                inverse = np.divide(np.float32(1.0), scales, out=np.zeros_like(scales), where=scales > 0)
            # a block whose largest magnitude is below ~3.7e-37 has a scale whose inverse overflows
            # float32 (0 x inf would be NaN): those rare blocks are divided by their scale instead
            tiny = np.flatnonzero(np.isinf(inverse))
            inverse[tiny] = 0.0
            np.multiply(rows, inverse[:, None], out=buf)
            if tiny.size:
                buf[tiny] = rows[tiny] / scales[tiny, None]
            np.rint(buf, out=buf)
            np.clip(buf, -127, 127, out=buf)
            q[lo:hi] = buf.reshape(-1)

    lanes.run_lanes(lane, lanes.lanes_for(n, len(runs)))
    return {"q": q.reshape(x.shape), "scale": scale, "block": INT8_BLOCK}


def _topk(x: np.ndarray, fraction: float) -> dict[str, Any]:
    flat = x.reshape(-1)
    k = topk_count(flat.size, fraction)
    if k == 0:
        kept = np.zeros(0, np.int64)
    else:
        kept = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        kept.sort()
    dtype = np.int32 if flat.size <= np.iinfo(np.int32).max else np.int64
    return {"shape": list(x.shape), "indices": kept.astype(dtype), "values": flat[kept].astype(np.float32)}


def deltas(params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params - base`` layer by layer, in float32: the delta a worker sends."""
    return {k: np.subtract(x, base[k], dtype=np.float32) for k, x in params.items()}


def encode_params(params: Mapping[str, np.ndarray], scheme: Scheme, *,
                  base: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Each float32 layer of ``params`` in ``scheme``'s wire form (not ``none``). ValueError for a
    value fp16 cannot hold. With ``base``, what is encoded is the delta ``params - base`` (the
    same bits as subtracting first; int8 forms it block by block, without a model-sized array)."""
    if base is not None and scheme.name != "int8":
        params = deltas(params, base)
    out: dict[str, dict[str, Any]] = {}
    for name, x in params.items():
        if scheme.name == "fp16":
            top = float(np.finfo(np.float16).max)
            if x.size and (float(x.max()) > top or float(x.min()) < -top):  # no model-sized temporary
                raise ValueError(f"{name} has values beyond float16's range (±65504); use --compress int8")
            out[name] = {"values": x.astype(np.float16)}
        elif scheme.name == "int8":
            out[name] = _int8(np.asarray(x, np.float32), None if base is None else np.asarray(base[name], np.float32))
        elif scheme.name == "topk":
            assert scheme.fraction is not None
            out[name] = _topk(np.asarray(x, np.float32), scheme.fraction)
        else:
            raise ValueError(f"nothing to encode for compression {scheme.text!r}")
    return out


def decompress(layers: Mapping[str, Mapping[str, Any]], scheme: Scheme) -> dict[str, np.ndarray]:
    """What the aggregator will make of :func:`encode_params`'s output (no limit on its size)."""
    return decode_params(dict(layers), scheme, max_bytes=2**62, where="params")


# ------------------------------------------------------------------ decoding (the aggregator)


def _array(layer: Mapping[str, Any], key: str, dtypes: tuple[np.dtype, ...], where: str) -> np.ndarray:
    value = layer[key]
    if type(value) is not np.ndarray:
        raise DecodeError(f"{where}[{key!r}] must be an array, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise DecodeError(f"{where}[{key!r}] has dtype {value.dtype.str}, expected {' or '.join(d.str for d in dtypes)}")
    return value


def _vector(layer: Mapping[str, Any], key: str, dtypes: tuple[np.dtype, ...], where: str) -> np.ndarray:
    value = _array(layer, key, dtypes, where)
    if value.ndim != 1:
        raise DecodeError(f"{where}[{key!r}] must be 1-dimensional, has shape {value.shape}")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if type(value) is not list or len(value) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in value):
        raise DecodeError(f"{where}['shape'] must be a list of at most {_MAX_NDIM} non-negative ints")
    return tuple(value)


def _decode_fp16(layer: Mapping[str, Any], where: str) -> np.ndarray:
    return _array(layer, "values", (_F16,), where).astype(np.float32)  # the codec checked finiteness


def _decode_int8(layer: Mapping[str, Any], where: str) -> np.ndarray:
    q = _array(layer, "q", (_I8,), where)
    scale = _vector(layer, "scale", (_F32,), where)
    block = layer["block"]
    if type(block) is not int or not 1 <= block <= 2**31:
        raise DecodeError(f"{where}['block'] must be an int in [1, 2**31], got {block!r}")
    n = q.size
    blocks = -(-n // block)
    if scale.size != blocks:
        raise DecodeError(f"{where} has {scale.size} scales; {n} values in blocks of {block} need {blocks}")
    if scale.size and (float(scale.min()) < 0.0 or float(scale.max()) > _MAX_SCALE):
        raise DecodeError(f"{where}['scale'] must be in [0, {_MAX_SCALE:.3g}] (finite, not negative)")
    if n and int(q.min()) < -127:
        raise DecodeError(f"{where}['q'] holds -128; int8 values must be in [-127, 127]")
    out = np.empty(q.shape, np.float32)
    flat, values = q.reshape(-1), out.reshape(-1)
    # widen (exact), then scale in place, a cache-sized run of blocks at a time: the same bits as
    # multiplying the int8 by the float32 scales in one ufunc, which casts through a buffer (2x slower)
    step = _CHUNK_BLOCKS * block
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        run = values[lo:hi]
        np.copyto(run, flat[lo:hi], casting="unsafe")
        whole = (hi - lo) // block
        first = lo // block
        run[: whole * block].reshape(whole, block)[...] *= scale[first: first + whole, None]
        if whole * block < hi - lo:  # the last, partial block
            run[whole * block:] *= scale[first + whole]
    return out


def _decode_topk(layer: Mapping[str, Any], fraction: float, where: str) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    shape = _shape(layer["shape"], where)
    size = math.prod(shape)
    indices = _vector(layer, "indices", _INDEX_DTYPES, where)
    values = _vector(layer, "values", (_F32,), where)
    if indices.size != values.size:
        raise DecodeError(f"{where} has {indices.size} indices and {values.size} values")
    most = topk_count(size, fraction)
    if indices.size > most:
        raise DecodeError(f"{where} keeps {indices.size} of {size} entries; topk:{fraction!r} keeps at most {most}")
    if indices.size:
        if int(indices[0]) < 0 or int(indices[-1]) >= size:
            raise DecodeError(f"{where}['indices'] must be in [0, {size}) and increasing")
        if indices.size > 1 and not bool(np.all(indices[1:] > indices[:-1])):
            raise DecodeError(f"{where}['indices'] must be strictly increasing (sorted, no duplicates)")
    return shape, indices, values


def _size_of(layer: Mapping[str, Any], scheme: Scheme, where: str) -> int:
    """The number of float32 elements ``layer`` decompresses to (checked before allocating)."""
    if scheme.name == "topk":
        return math.prod(_shape(layer["shape"], where))
    key = "values" if scheme.name == "fp16" else "q"
    value = layer[key]
    return int(value.size) if type(value) is np.ndarray else 0


def decode_params(params: Any, scheme: Scheme, *, max_bytes: int, where: str = "update.params") -> dict[str, np.ndarray]:
    """The float32 layers that ``params`` (name -> ``scheme``'s layer map) stand for; DecodeError
    naming the layer for anything out of place, or a total over ``max_bytes`` decompressed."""
    if type(params) is not dict:
        raise DecodeError(f"{where} must be a map of name -> {scheme.text} layer, got {type(params).__name__}")
    keys = _KEYS[scheme.name]
    total = 0
    for name, layer in params.items():
        at = f"{where}[{name!r}]"
        if type(layer) is not dict:
            raise DecodeError(f"{at} is a {type(layer).__name__}, not a {scheme.text} layer (a map of {', '.join(sorted(keys))})")
        if layer.keys() != keys:
            raise DecodeError(f"{at} has keys {sorted(layer)}; a {scheme.text} layer has exactly {sorted(keys)}")
        total += 4 * _size_of(layer, scheme, at)
    if total > max_bytes:
        raise DecodeError(f"{where} decompresses to {total} bytes, over the limit of {max_bytes}")
    out: dict[str, np.ndarray] = {}
    for name, layer in params.items():
        at = f"{where}[{name!r}]"
        if scheme.name == "fp16":
            out[name] = _decode_fp16(layer, at)
        elif scheme.name == "int8":
            out[name] = _decode_int8(layer, at)
        else:
            assert scheme.fraction is not None
            shape, indices, values = _decode_topk(layer, scheme.fraction, at)
            dense = np.zeros(math.prod(shape), np.float32)
            dense[indices] = values
            out[name] = dense.reshape(shape)
    return out


# ------------------------------------------------------------------ error feedback (the worker)


@dataclass(frozen=True)
class Compressed:
    """One compressed delta: its wire layers, and the residual to keep once it is confirmed."""

    layers: dict[str, dict[str, Any]]
    run_id: str
    residual: dict[str, np.ndarray] | None


class ErrorFeedback:
    """A worker's residuals: what its top-k updates have not sent yet, for the current run.

    The residual lives in this process's memory and is dropped on restart and when the worker
    moves to another run (its model, and what the residual means, are gone). Persisting it would
    need a per-worker state file whose loss or staleness is a new failure mode, for what is at
    most one delta's worth of delayed signal: a restarted worker loses no more than one lost
    update would. The new residual is taken by :meth:`keep` only once the update is confirmed,
    so a task given back and trained again does not count the same residual twice.
    """

    def __init__(self) -> None:
        self._run = ""
        self._residual: dict[str, np.ndarray] | None = None

    def compress(self, run_id: str, delta: Mapping[str, np.ndarray], scheme: Scheme, *,
                 feedback: bool = True, base: Mapping[str, np.ndarray] | None = None) -> Compressed:
        """``delta`` (plus the residual, for top-k) in ``scheme``'s wire form. ValueError when a
        value cannot be encoded. With ``base``, ``delta`` holds the trained weights and the delta
        is ``delta - base`` (see :func:`encode_params`)."""
        if scheme.name != "topk" or not feedback:
            return Compressed(encode_params(delta, scheme, base=base), run_id, None)
        if base is not None:
            delta = deltas(delta, base)
        residual = self._residual if self._run == run_id else None
        if residual is not None and any(
                name not in residual or residual[name].shape != x.shape for name, x in delta.items()):
            residual = None  # another model: the old residual means nothing to it
        total = {k: np.ascontiguousarray(x + residual[k] if residual is not None else np.array(x, np.float32, order="C"))
                 for k, x in delta.items()}  # C order: the residual is zeroed through a flat view
        layers = encode_params(total, scheme)
        for k, x in total.items():
            x.reshape(-1)[layers[k]["indices"]] = 0.0  # sent exactly; the rest is the residual
        return Compressed(layers, run_id, total)

    def keep(self, compressed: Compressed) -> None:
        """The update of ``compressed`` was confirmed: its residual is the one to add next."""
        if compressed.residual is not None:
            self._run, self._residual = compressed.run_id, compressed.residual

    @property
    def residual(self) -> dict[str, np.ndarray] | None:
        return self._residual


# ------------------------------------------------------------------ bfloat16 model versions
_BF16_BLOCK = 1 << 18  # elements rounded at a time (1 MiB of uint32 scratch)
_BF16_EXPONENT = np.uint16(0x7F80)


def to_bfloat16(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each float32 layer as bfloat16 bit patterns (``<u2``: the upper half of the float32 bits,
    rounded to nearest, ties to even): half the bytes of a model version, relative error <= 2**-8.

    Why bfloat16 and not float16: it keeps float32's exponent, so no weight under- or overflows,
    and numpy has no vectorised float16 cast on this class of CPU (~100 ms per 10M values, where
    this integer rounding takes ~8 ms). ValueError for a value that rounds to infinity or is
    not finite (the model of a broken run; it is not published)."""
    out: dict[str, np.ndarray] = {}
    for name, x in params.items():
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
        bits = np.empty(flat.size, np.uint16)
        scratch = np.empty(min(flat.size, _BF16_BLOCK), np.uint32)
        for lo in range(0, flat.size, _BF16_BLOCK):
            src = flat[lo: lo + _BF16_BLOCK]
            tmp = scratch[: src.size]
            np.right_shift(src, 16, out=tmp)
            np.bitwise_and(tmp, 1, out=tmp)  # the lowest kept bit: ties go to even
            tmp += 0x7FFF
            tmp += src  # no overflow: the largest finite float32 plus 0x8000 stays below 2**32
            np.right_shift(tmp, 16, out=tmp)
            bits[lo: lo + src.size] = tmp
        if bits.size and np.any((bits & _BF16_EXPONENT) == _BF16_EXPONENT):
            raise ValueError(f"{name} holds values that are not finite in bfloat16 (|x| > 3.39e38, inf or nan)")
        out[name] = bits.reshape(np.shape(x))
    return out


def from_bfloat16(params: Mapping[str, Any], where: str = "model.params") -> dict[str, np.ndarray]:
    """:func:`to_bfloat16`'s layers back as fresh float32 arrays; DecodeError (naming the layer)
    for a layer that is not ``<u2`` or holds a non-finite value."""
    out: dict[str, np.ndarray] = {}
    for name, bits in params.items():
        if not isinstance(bits, np.ndarray) or bits.dtype != np.dtype("<u2"):
            got = bits.dtype.str if isinstance(bits, np.ndarray) else type(bits).__name__
            raise DecodeError(f"{where}[{name!r}] must be bfloat16 bits (<u2) in a bfloat16 model, got {got}")
        wide = bits.astype(np.uint32)
        wide <<= 16
        values = wide.view(np.float32)  # a bfloat16 inf or NaN widens to a float32 one
        if not codec.all_finite(values):
            raise DecodeError(f"{where}[{name!r}] holds a value that is not finite")
        out[name] = values
    return out


# ------------------------------------------------------------------ model versions by --model-dtype
def model_wire(params: Mapping[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """A model version's float32 ``params`` as ``dtype`` sends them:

    * ``float32``: as they are;
    * ``bfloat16``: :func:`to_bfloat16` (2 bytes a weight, relative error <= 2**-8);
    * ``int8``: the int8 layers of ``--compress int8`` (1 byte a weight and a float32 scale per
      :data:`INT8_BLOCK`; error <= scale/2, a 254th of the block's largest weight).

    Workers train on what arrives and send deltas from it, which the aggregator adds to its
    float32 model: the rounding of one version is never carried into the next. ValueError for
    a value that is not finite (the model of a broken run; it is not published)."""
    if dtype == "float32":
        return dict(params)
    if dtype == BFLOAT16:
        return to_bfloat16(params)
    if dtype != INT8:
        raise ValueError(f"unknown model dtype {dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
    for name, x in params.items():
        if not codec.all_finite(np.asarray(x, np.float32).reshape(-1)):
            raise ValueError(f"{name} holds values that are not finite (inf or nan)")
    return encode_params(params, Scheme(INT8))


def model_params(params: dict[str, Any], dtype: str, *, max_bytes: int, where: str = "model.params") -> dict[str, np.ndarray]:
    """:func:`model_wire`'s layers of a ``bfloat16`` or ``int8`` model back as fresh float32 arrays,
    strictly checked (DecodeError naming the layer; an int8 model over ``max_bytes`` once widened
    is refused before it is)."""
    if dtype == BFLOAT16:
        return from_bfloat16(params, where)
    if dtype == INT8:
        return decode_params(params, Scheme(INT8), max_bytes=max_bytes, where=where)
    raise DecodeError(f"{where}: no wire form for model dtype {dtype!r}")
