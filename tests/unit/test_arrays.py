"""ArrayPool: model-sized buffers lent again only once nothing refers to them, never more than needed."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.shared import compression
from fedmq.shared.arrays import ArrayPool

KB = 1024


def pool(max_bytes: int = 1 << 30) -> ArrayPool:
    return ArrayPool(max_bytes=max_bytes, min_bytes=KB)


def test_a_buffer_is_lent_again_once_its_array_is_gone() -> None:
    p = pool()
    a = p.empty((256, 4), np.float32)
    a[...] = 1.0
    address = a.ctypes.data
    del a
    b = p.empty(1024, np.float32)
    assert (p.allocated, p.reused) == (1, 1)
    assert b.ctypes.data == address and b.shape == (1024,) and b.dtype == np.float32


@pytest.mark.parametrize("keep", ["slice", "memoryview", "reshaped", "bytes view"])
def test_a_buffer_is_not_lent_while_a_view_of_it_lives(keep: str) -> None:
    p = pool()
    a = p.empty(1024, np.float32)
    views = {"slice": lambda x: x[10:20], "memoryview": memoryview, "reshaped": lambda x: x.reshape(32, 32),
             "bytes view": lambda x: x.view(np.uint8)}
    held = views[keep](a)
    del a
    b = p.empty(1024, np.float32)
    b[...] = 7.0
    assert p.reused == 0 and p.allocated == 2
    assert not np.shares_memory(np.asarray(held), b)
    del held, b
    p.empty(1024, np.float32)
    assert p.reused == 1


def test_the_pool_holds_no_more_than_it_once_lent_at_the_same_time() -> None:
    p = pool()
    a, b = p.empty(1024, np.float32), p.empty(1024, np.float32)  # 8 KiB lent at once
    del a, b
    c = p.empty(2048, np.float32)  # 8 KiB more: the two free 4 KiB buffers go
    assert p.bytes_held == 8 * KB
    del c
    d = p.empty(512, np.float32)  # 2 KiB: lent beside nothing; the free 8 KiB one goes (oldest first)
    assert p.bytes_held <= 8 * KB
    del d


def test_over_the_cap_or_under_the_floor_an_array_is_an_ordinary_one() -> None:
    p = ArrayPool(max_bytes=8 * KB, min_bytes=KB)
    small = p.empty(16, np.float32)  # 64 bytes
    a = p.empty(1024, np.float32)
    b = p.empty(1024, np.float32)
    c = p.empty(1024, np.float32)  # 12 KiB lent would pass the 8 KiB cap
    assert p.allocated == 2 and p.bytes_held == 8 * KB
    assert c.flags.owndata and small.flags.owndata
    assert ArrayPool().empty(1 << 20, np.uint8).flags.owndata  # the default pool lends nothing (max_bytes 0)
    del a, b


@pytest.mark.parametrize("n", [1024 * 600 + 77, 1024 * 256, 5])
def test_int8_decodes_into_pooled_arrays_with_the_bits_of_the_reference_formula(n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.uniform(0.01, 10, n)).astype(np.float32)
    layer = compression._int8(x)
    q, scale, block = layer["q"], layer["scale"], layer["block"]
    reference = np.repeat(scale, block)[:n] * q.astype(np.float32)  # float32(q) * its block's scale
    p = pool()
    for _ in range(2):  # the second decode reuses the first's buffer (it was let go)
        out = compression.decode_params({"w": layer}, compression.parse("int8"), max_bytes=8 * n, empty=p.empty)["w"]
        assert out.dtype == np.float32 and out.shape == (n,)
        assert np.array_equal(out.view(np.uint32), reference.view(np.uint32))
        del out
    assert p.reused == (1 if 4 * n >= KB else 0)


@pytest.mark.parametrize("scheme", ["fp16", "topk:0.1"])
def test_other_schemes_decode_into_pooled_arrays_as_into_fresh_ones(scheme: str) -> None:
    x = np.random.default_rng(1).standard_normal((64, 40)).astype(np.float32)
    parsed = compression.parse(scheme)
    layers = compression.encode_params({"w": x}, parsed)
    fresh = compression.decode_params(layers, parsed, max_bytes=1 << 20)["w"]
    p = pool()
    dirty = p.empty(x.shape, np.float32)
    dirty[...] = np.nan  # a reused buffer's old contents must not show through (top-k fills zeros)
    del dirty
    pooled = compression.decode_params(layers, parsed, max_bytes=1 << 20, empty=p.empty)["w"]
    assert p.reused == 1
    assert np.array_equal(pooled, fresh)
