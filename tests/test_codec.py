"""Round trips of every codec: shape/dtype kept, error within the declared bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.wire.codec import (
    CodecError,
    CodecSpec,
    InvalidInputError,
    SpecError,
    UnknownCodecError,
    batchable,
    check_values,
    codec_names,
    decode,
    encode,
    get_codec,
    parse_spec,
    split_batch,
)
from agent.wire.codec.frame import FLAG_LZ4
from agent.wire.codec.registry import lz4_pays

SPECS = [
    "raw", "fp16", "uint8", "uint8:per_channel=1", "int8", "int8:per_channel=1",
    "zfp", "zfp:accuracy=0.001", "zfp:accuracy=0.1", "zfp:rate=8", "zfp:precision=12",
    "defer",
]
ALL_SPECS = SPECS + [s + "+lz4" for s in SPECS if s != "defer"]
LOSSLESS = [s for s in ALL_SPECS if s.split("+")[0] in ("raw", "zfp", "defer")]
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5),  # tiny, empty, 0-d
    st.sampled_from([(10,), (1, 10), (1, 8, 3, 3), (2, 16, 6, 6), (1, 32, 12, 12), (4, 8, 7, 5)]),
)


def activations(shape: tuple[int, ...], seed: int, scale: float) -> np.ndarray:
    """Post-ReLU-like data: smoothed noise with a per-channel offset, clipped at 0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if x.ndim >= 2 and x.size:
        x = (x + np.roll(x, 1, axis=-1) + np.roll(x, 1, axis=-2)) / 3
    return np.maximum(0, x - 0.3) * np.float32(scale)


@st.composite
def finite_arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(shapes)
    if draw(st.booleans()):
        return activations(shape, draw(st.integers(0, 2**16)), draw(st.sampled_from([1e-3, 1, 50])))
    elems = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_subnormal=False)
    return draw(hnp.arrays(np.float32, shape, elements=elems))


def check(a: np.ndarray, spec: str) -> np.ndarray:
    out = decode(encode(a, spec))
    assert out.shape == a.shape and out.dtype == np.float32
    bound = get_codec(parse_spec(spec).name).error_bound(a, spec)
    if bound is not None and a.size:
        err = float(np.max(np.abs(out.astype(np.float64) - a)))
        assert err <= bound, (spec, err, bound)
    return out


@pytest.mark.parametrize("spec", ALL_SPECS)
@FAST
@given(a=finite_arrays())
def test_round_trip_within_bound(spec: str, a: np.ndarray) -> None:
    out = check(a, spec)
    if get_codec(parse_spec(spec).name).is_lossless(parse_spec(spec)):
        assert out.tobytes() == a.tobytes()


@pytest.mark.parametrize("spec", LOSSLESS)
@settings(max_examples=25, deadline=None)
@given(bits=hnp.arrays(np.uint32, hnp.array_shapes(max_dims=4, max_side=6)))
def test_lossless_is_bit_exact_for_any_pattern(spec: str, bits: np.ndarray) -> None:
    """NaN (any payload), inf, -0.0 and subnormals survive raw, zfp reversible and defer."""
    a = bits.view(np.float32)
    assert decode(encode(a, spec)).view(np.uint32).tobytes() == bits.tobytes()


@pytest.mark.parametrize("spec", ["uint8", "uint8:per_channel=1", "int8", "int8:per_channel=1"])
@settings(max_examples=40, deadline=None)
@given(a=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=4),
                    elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_quant_extreme_ranges(spec: str, a: np.ndarray) -> None:
    """Full float32 range, subnormals and tiny spans: no overflow, still within bound."""
    out = check(a, spec)
    assert np.isfinite(out).all()


def test_fp16_bound_and_special_values() -> None:
    a = np.array([0.0, 1e-7, -3.5, 65504.0, np.inf, -np.inf, np.nan], np.float32)
    out = decode(encode(a, "fp16"))
    np.testing.assert_array_equal(out[4:6], a[4:6])
    assert np.isnan(out[6])
    with pytest.raises(InvalidInputError):
        encode(np.array([70000.0], np.float32), "fp16")


@pytest.mark.parametrize("spec", ["uint8", "int8:per_channel=1", "zfp:accuracy=0.01", "zfp:rate=4",
                                  "zfp:precision=10"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_lossy_refuses_non_finite(spec: str, bad: float) -> None:
    a = np.ones((1, 4, 4, 4), np.float32)
    a[0, 1, 2, 3] = bad
    with pytest.raises(InvalidInputError):
        encode(a, spec)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_constant_empty_noncontiguous_float64(spec: str) -> None:
    const = np.full((2, 3, 4, 4), 2.5, np.float32)
    if "rate" not in spec:  # fixed rate may not hit a constant exactly
        np.testing.assert_array_equal(decode(encode(const, spec)), const)
    for shape in [(0,), (3, 0, 2), (1, 0)]:
        empty = decode(encode(np.zeros(shape, np.float32), spec))
        assert empty.shape == shape and empty.dtype == np.float32
    base = activations((2, 8, 6, 6), 1, 1.0)
    strided = base[:, ::2, :, ::-1]
    assert not strided.flags.c_contiguous
    check(strided, spec)
    f64 = check(base.astype(np.float64), spec)
    assert f64.dtype == np.float32


def test_uint8_keeps_relu_zeros_exact() -> None:
    a = activations((1, 16, 8, 8), 3, 4.0)
    out = decode(encode(a, "uint8"))
    assert np.all(out[a == 0] == 0)


def test_zfp_rate_and_precision_tighten_monotonically() -> None:
    a = activations((2, 32, 12, 12), 7, 2.0)
    peak = float(np.abs(a).max())

    def rel(spec: str) -> float:
        return float(np.abs(decode(encode(a, spec)) - a).max()) / peak

    prec = [rel(f"zfp:precision={p}") for p in (6, 10, 14, 18, 24)]
    rate = [rel(f"zfp:rate={r}") for r in (6, 8, 12, 16, 24)]
    assert prec == sorted(prec, reverse=True) and prec[-1] < 1e-4, prec
    assert rate == sorted(rate, reverse=True) and rate[-1] < 1e-3, rate
    for p in (8, 12, 16):  # measured: at most 2^(3-p) of the peak on these maps
        assert rel(f"zfp:precision={p}") <= 2.0 ** (4 - p)
    size = len(encode(a, "zfp:rate=8"))
    assert abs(size - a.size) < 0.02 * a.size  # fixed rate: 8 bits/value


def test_small_tensors_do_not_expand_under_zfp() -> None:
    logits = np.linspace(-3, 3, 10).astype(np.float32)
    maps = activations((1, 64, 3, 3), 2, 1.0)
    for a in (logits, maps):
        assert len(encode(a, "zfp:rate=16")) < a.nbytes * 0.5 + 64
        assert len(encode(a, "zfp")) < a.nbytes * 1.2 + 64


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("raw", "raw"), ("fp16+lz4", "fp16+lz4"), ("uint8:per_channel=0", "uint8"),
        ("uint8:per_channel=1+lz4", "uint8:per_channel=1+lz4"), ("zfp", "zfp"),
        ("zfp:accuracy=1e-3", "zfp:accuracy=0.001"), ("zfp:rate=8", "zfp:rate=8"),
        ("zfp:rate=8.5", "zfp:rate=8.5"), ("zfp:precision=12+lz4", "zfp:precision=12+lz4"),
        ("defer", "defer"), (" int8 ", "int8"),
    ],
)
def test_spec_canonical_round_trip(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) == spec
    assert isinstance(spec, CodecSpec)


@pytest.mark.parametrize(
    "text",
    ["zfp:accuracy=0", "zfp:rate=40", "zfp:rate=2", "zfp:precision=0", "zfp:rate=8,precision=4",
     "zfp:foo=1", "zfp:accuracy=x", "uint8:per_channel=2", "raw:x=1", "defer+lz4", "zfp:",
     "zfp:rate", "zfp:accuracy=nan"],
)
def test_bad_specs(text: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)


def test_registry() -> None:
    assert codec_names() == ["defer", "fp16", "int8", "raw", "uint8", "zfp"]
    with pytest.raises(UnknownCodecError):
        parse_spec("gzip")
    with pytest.raises(UnknownCodecError):
        get_codec("gzip")
    assert get_codec("raw").lossless and not get_codec("uint8").lossless
    assert get_codec("zfp").is_lossless(parse_spec("zfp"))
    assert not get_codec("zfp").is_lossless(parse_spec("zfp:rate=4"))
    with pytest.raises(InvalidInputError):
        encode(np.array(["a"]), "raw")
    assert issubclass(InvalidInputError, CodecError) and issubclass(CodecError, ValueError)


def test_int_and_float16_inputs_are_converted() -> None:
    ints = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    np.testing.assert_array_equal(decode(encode(ints, "zfp")), ints.astype(np.float32))
    halves = np.linspace(0, 2, 16, dtype=np.float16)
    np.testing.assert_array_equal(decode(encode(halves, "fp16")), halves.astype(np.float32))


def _frame_with_scales(spec: str, scales: list[float]) -> bytes:
    """A well-formed 8-bit frame of shape (2, 3) whose scale/offset floats are replaced."""
    import struct

    from agent.wire.codec.frame import pack_frame, parse_frame

    raw = parse_frame(encode(np.arange(6, dtype=np.float32).reshape(2, 3), spec), 1 << 20)
    head = struct.pack(f"<{len(scales)}f", *scales)
    return pack_frame(raw.codec_id, raw.flags, raw.shape, raw.params,
                      head + bytes(raw.payload)[len(head):])


@pytest.mark.parametrize("spec", ALL_SPECS)
@FAST
@given(a=finite_arrays())
def test_check_values_agrees_with_decode(spec: str, a: np.ndarray) -> None:
    """Ingest's full validation (``check_values``) checks what ``decode`` checks, and
    reports the same finiteness, whether or not the codec needs a decode for it."""
    frame = encode(a, spec)
    assert check_values(frame) == (decode(frame).shape, True)


@pytest.mark.parametrize("spec", ["raw", "raw+lz4", "fp16", "fp16+lz4", "zfp", "defer"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_values_finds_what_lossless_codecs_carry(spec: str, bad: float) -> None:
    a = np.ones((2, 4, 3), np.float32)
    a[1, 2, 0] = bad
    frame = encode(a, spec)
    assert check_values(frame) == ((2, 4, 3), False)
    assert not np.isfinite(decode(frame)).all()
    split = split_batch(frame) if batchable(spec) else None
    if split is not None:
        assert split.finite is not None and split.finite.tolist() == [True, False]


@pytest.mark.parametrize(("spec", "scales"), [
    ("uint8", [np.nan, 1.0]), ("uint8", [0.0, np.inf]), ("uint8", [0.0, -1.0]),
    ("int8", [np.nan]), ("int8", [-2.0]),
])
def test_check_values_refuses_bad_scales_as_decode_does(spec: str, scales: list[float]) -> None:
    frame = _frame_with_scales(spec, scales)
    with pytest.raises(CodecError, match="scale"):
        decode(frame)
    with pytest.raises(CodecError, match="scale"):
        check_values(frame)
    with pytest.raises(CodecError, match="scale"):
        split_batch(frame)


@pytest.mark.parametrize("spec", ["uint8", "uint8:per_channel=1+lz4", "int8+lz4"])
def test_8bit_frames_are_checked_without_a_decode(spec: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite scales prove every 8-bit value finite, so the full validation skips the
    float32 copy; extreme but finite scales decode clipped to float32, still finite."""
    x = np.linspace(-3e38, 3e38, 24, dtype=np.float32).reshape(2, 3, 4)
    frame = encode(x, spec)
    assert np.isfinite(decode(frame)).all()
    codec = get_codec(parse_spec(spec).name)

    def no_decode(*_a: object) -> np.ndarray:
        raise AssertionError("decoded")

    monkeypatch.setattr(type(codec), "decode_payload", no_decode)
    assert check_values(frame) == ((2, 3, 4), True)
    split = split_batch(frame)
    assert split.finite is not None and split.finite.tolist() == [True, True]


def test_lz4_is_kept_only_where_it_saves_bytes() -> None:
    """``+lz4`` compresses a frame only where it saves at least 1/32 of its bytes: post-ReLU
    maps keep the LZ4 flag, noise after 8-bit quantisation (as effnet-lite0's activations
    are to LZ4) goes without it, so that no reader pays a decompression for nothing. Both
    decode exactly as the codec without LZ4 does, and cut into the same samples."""
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal((8, 16, 12, 12)), 0).astype(np.float32)
    relu[:, :, ::2] = 0  # half the rows zero: what LZ4 finds in a post-ReLU map
    noise = rng.standard_normal((8, 16, 12, 12)).astype(np.float32)
    for a, kept in ((relu, True), (noise, False)):
        frame, plain = encode(a, "uint8+lz4"), encode(a, "uint8")
        assert bool(frame[6] & FLAG_LZ4) is kept
        assert (len(frame) < len(plain)) is kept
        assert np.array_equal(decode(frame), decode(plain))
        assert split_batch(frame).frames == split_batch(plain).frames
    assert lz4_pays(3200, 3100) and not lz4_pays(3200, 3101) and not lz4_pays(100, 120)
