"""Im2col rows of a convolution's input at chosen output positions, gathered without padding the input.

`calibration.hessian_rows` draws a few output positions per sample and needs the receptive field of each as
one row (features in the weight's memory order: input channel, then kernel taps). Padding the whole input and
unfolding a strided window view cost the size of the *input* per call (ResNet-50's stride-2 3x3 conv over
128 x 56 x 56: 0.86 ms for 59 rows); here the input coordinates of every (output position, tap) pair are
computed from the drawn positions (for small geometries once for all positions, `CACHED_ENTRIES`), so a call
gathers only the rows it returns and zeroes the taps that fall in the padding: 0.03-0.4 ms for the same rows,
equal to the padded unfold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import onnx

from onnxprune.graph import attrs

__all__ = ["CACHED_ENTRIES", "ConvGeometry", "conv_geometry", "conv_rows", "flat_index"]


@dataclass(frozen=True)
class ConvGeometry:
    """Where the taps of a convolution's output positions read its input.

    Attributes:
        spatial: the input's spatial shape.
        out: the output's spatial shape.
        starts: per spatial axis, the input coordinate of output position 0's first tap (``-pad``).
        strides: per spatial axis, the input step between neighbouring output positions.
        taps: per spatial axis, [taps] input offsets of the kernel's taps (dilated) in the weight's memory order.
        flat, padding: `flat_index` of every output position, kept where the geometry is small (else None).
    """

    spatial: tuple[int, ...]
    out: tuple[int, ...]
    starts: tuple[int, ...]
    strides: tuple[int, ...]
    taps: tuple[np.ndarray, ...]
    flat: np.ndarray | None = None
    padding: np.ndarray | None = None

    @property
    def positions(self) -> int:
        return int(np.prod(self.out, dtype=np.int64))


def _pads(node: onnx.NodeProto, spatial: tuple[int, ...], kshape: tuple[int, ...]) -> tuple[list[int], ...]:
    """(strides, dilations, pads [lo..., hi...]) of a Conv node, auto_pad resolved for this input size."""
    a = attrs(node)
    nd = len(kshape)
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kshape[i] - 1) * dil[i] + 1 - spatial[i])
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[nd + i] = lo, total - lo
    return strides, dil, pads


def conv_geometry(node: onnx.NodeProto, spatial: tuple[int, ...], kshape: tuple[int, ...]) -> ConvGeometry:
    """The `ConvGeometry` of `node` over an input of spatial shape `spatial` (cached per geometry)."""
    strides, dil, pads = _pads(node, spatial, kshape)
    return _geometry(tuple(spatial), tuple(kshape), tuple(strides), tuple(dil), tuple(pads))


# a geometry with at most this many (output position, tap) pairs keeps the flat index of all of them (int32: at
# most 1 MiB, and `_geometry` holds up to 64): gathering at drawn positions then skips the index arithmetic
# (ResNet-50's layers: 30-70 us of 50-440 per call); larger ones (high-resolution inputs) compute it per call
CACHED_ENTRIES = 1 << 18


@lru_cache(maxsize=64)
def _geometry(spatial: tuple[int, ...], kshape: tuple[int, ...], strides: tuple[int, ...], dil: tuple[int, ...],
              pads: tuple[int, ...]) -> ConvGeometry:
    nd = len(kshape)
    out = tuple((spatial[i] + pads[i] + pads[nd + i] - ((kshape[i] - 1) * dil[i] + 1)) // strides[i] + 1
                for i in range(nd))
    tap = np.unravel_index(np.arange(int(np.prod(kshape, dtype=np.int64))), kshape)
    taps = tuple(tap[i] * dil[i] for i in range(nd))
    geo = ConvGeometry(spatial, out, tuple(-pads[i] for i in range(nd)), strides, taps)
    if geo.positions * len(taps[0]) > CACHED_ENTRIES:
        return geo
    flat, padding = flat_index(geo, np.arange(geo.positions))
    for a in (*taps, flat) + ((padding,) if padding is not None else ()):
        a.setflags(write=False)
    return replace(geo, flat=flat.astype(np.int32), padding=padding)


def flat_index(geo: ConvGeometry, at: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """([positions, taps] index into the flat spatial positions of the input, clipped into it; [positions, taps]
    True where the tap lies in the zero padding, or None where none does) of the output positions `at`."""
    pos = np.unravel_index(at, geo.out)
    flat = np.zeros((len(at), len(geo.taps[0])), np.intp)
    padding = None
    for i, size in enumerate(geo.spatial):
        c = (pos[i] * geo.strides[i] + geo.starts[i])[:, None] + geo.taps[i][None, :]
        outside = (c < 0) | (c >= size)
        if outside.any():
            padding = outside if padding is None else padding | outside
            np.clip(c, 0, size - 1, out=c)
        flat *= size
        flat += c
    return flat, padding


def conv_rows(x: np.ndarray, geo: ConvGeometry, pick: np.ndarray | None, channels: np.ndarray | None = None
              ) -> np.ndarray:
    """Rows [positions, C x taps] of one sample's input `x` [C, *spatial] at output positions `pick` (flat
    indices; None: every position, in order): ``x`` zero-padded and unfolded, the same values. `channels`: only
    these of x's channels (rows [positions, len(channels) x taps]), selected after the gather, which reads a
    few positions: selecting first copied the whole input (the seq repair's masked runs, ResNet-50: ~3.5 CPU s)."""
    if geo.flat is not None:
        at = slice(None) if pick is None else pick
        flat, padding = geo.flat[at], None if geo.padding is None else geo.padding[at]
    else:
        flat, padding = flat_index(geo, np.arange(geo.positions) if pick is None else pick)
    if flat.size >= x[0].size:
        # at least as many (position, tap) pairs as input positions (a 3x3 conv over a 7 x 7 or 14 x 14 input):
        # transposing the input once and gathering whole channel vectors is 1.4-1.7x faster (ResNet-50's layer4
        # 3x3 convs: 0.31 -> 0.21 ms a sample); sparse picks keep the strided gather below
        g = np.ascontiguousarray(x.reshape(len(x), -1).T)[flat.reshape(-1)]
        if channels is not None:
            g = g[:, channels]
        if padding is not None:
            g[padding.reshape(-1)] = 0
        return g.reshape(*flat.shape, g.shape[1]).transpose(0, 2, 1).reshape(flat.shape[0], -1)
    # one gather along the flat spatial axis (a 1-D index: faster than one index array per axis)
    g = np.take(x.reshape(len(x), -1), flat.reshape(-1), axis=1)
    g = (g if channels is None else g[channels]).reshape(-1, *flat.shape)
    if padding is not None:
        g[:, padding] = 0
    return g.transpose(1, 0, 2).reshape(flat.shape[0], -1)
