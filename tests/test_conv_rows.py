"""`conv_rows`: im2col rows gathered at drawn output positions without padding the input equal the rows of the
zero-padded, unfolded input (the implementation it replaced), on every convolution geometry, and the statistics
built on them still match onnxruntime's convolution."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import conv_rows as conv_rows_module
from onnxprune.calibration import Consumer, hessian_rows, output_rows
from onnxprune.conv_rows import conv_geometry, conv_rows
from onnxprune.verify import run


def _padded_unfold(x: np.ndarray, node: onnx.NodeProto, kshape: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray]:
    """Reference: pad, unfold every receptive field with a strided window view, rows [positions, C x taps]."""
    a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    nd = len(kshape)
    strides, dil = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto = a.get("auto_pad", b"NOTSET").decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(nd):
            out = -(-x.shape[1 + i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kshape[i] - 1) * dil[i] + 1 - x.shape[1 + i])
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[nd + i] = lo, total - lo
    xp = np.pad(x, [(0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    ext = [(kshape[i] - 1) * dil[i] + 1 for i in range(nd)]
    win = np.lib.stride_tricks.sliding_window_view(xp, ext, axis=tuple(range(1, nd + 1)))
    win = win[(slice(None),) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dil)]
    out = win.shape[1 : 1 + nd]
    perm = tuple(range(1, 1 + nd)) + (0,) + tuple(range(1 + nd, 1 + 2 * nd))
    return out, win.transpose(perm).reshape(int(np.prod(out)), -1)


@pytest.fixture(autouse=True)
def _fresh_geometries():
    """Geometries cached under a patched `CACHED_ENTRIES` do not outlive the test that patched it."""
    conv_rows_module._geometry.cache_clear()
    yield
    conv_rows_module._geometry.cache_clear()


GEOMETRIES = [  # (spatial, kernel, attributes)
    ((9, 11), (3, 3), {"pads": [1, 1, 1, 1]}),
    ((9, 11), (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((12, 12), (1, 1), {}),
    ((12, 12), (1, 1), {"strides": [2, 2]}),
    ((10, 13), (3, 5), {"dilations": [2, 1], "pads": [2, 0, 1, 3]}),
    ((7, 7), (7, 7), {}),
    ((8, 9), (3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((8, 9), (4, 4), {"auto_pad": "SAME_LOWER"}),
    ((8, 9), (2, 3), {"auto_pad": "VALID", "strides": [1, 3]}),
    ((17,), (5,), {"pads": [2, 2], "dilations": [3]}),
    ((5, 6, 7), (3, 1, 2), {"pads": [1, 0, 1, 1, 0, 0], "strides": [1, 2, 1]}),
]


@pytest.mark.parametrize("cached", [True, False], ids=["index-cached", "index-per-call"])
@pytest.mark.parametrize("spatial,kernel,extra", GEOMETRIES)
def test_gathered_rows_equal_the_padded_unfold(spatial, kernel, extra, cached, monkeypatch):
    """Both ways of indexing: the whole geometry's index kept (small geometries) and computed per call (large)."""
    monkeypatch.setattr(conv_rows_module, "CACHED_ENTRIES", 1 << 18 if cached else 0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), **extra)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, *spatial)).astype(np.float32)
    x[0, (0,) * len(spatial)] = np.inf  # a non-finite input value stays where it is and never leaks into a pad tap
    out, want = _padded_unfold(x, node, kernel)
    geo = conv_geometry(node, spatial, kernel)
    assert geo.out == out
    assert (geo.flat is not None) == cached
    assert np.array_equal(conv_rows(x, geo, None), want)
    for n in (1, max(1, geo.positions // 3), geo.positions):
        pick = np.sort(rng.choice(geo.positions, n, replace=False))
        assert np.array_equal(conv_rows(x, geo, pick), want[pick])
        # a channel subset (a masked run's kept inputs), selected after the gather: the rows of x[channels]
        channels = np.array([2, 0])
        assert np.array_equal(conv_rows(x, geo, pick, channels), conv_rows(x[channels], geo, pick))


def test_hessian_rows_and_output_rows_line_up_with_onnxruntimes_convolution():
    """[x 1] rows times [W b] at the drawn positions are the conv's own outputs there: the rows are the receptive
    fields of the positions `output_rows` reads, for strided, dilated and SAME-padded convolutions."""
    rng = np.random.default_rng(1)
    for (spatial, kernel, extra), group_out in itertools.product(GEOMETRIES[:9], [4]):
        c_in = 3
        w = rng.standard_normal((group_out, c_in, *kernel)).astype(np.float32)
        b = rng.standard_normal(group_out).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(kernel), **extra)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c_in, *spatial])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        x = rng.standard_normal((2, c_in, *spatial)).astype(np.float32)
        y = run(model, {"x": x})[0]
        node.name = "c"
        consumer = Consumer(node=node, kind="conv", x="x", weight="w", in_axis=1, out_axis=0, x_axis=1)
        picks: list = []
        rows = hessian_rows(x, consumer, w.shape, 5, np.random.default_rng(2), picks)
        got = rows @ w.reshape(group_out, -1).T + b
        assert np.allclose(got, output_rows(y, consumer, picks), rtol=1e-4, atol=1e-4), (spatial, kernel, extra)
