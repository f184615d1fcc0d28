"""Hostile inputs for the fuzzer: byte-level mutations of a serialised model and edits of its proto.

`mutate_bytes` flips, overwrites, truncates, inserts and duplicates bytes. `HOSTILE` maps a name to an
edit ``(model, rng, files)`` that damages the proto the way broken exporters and attackers do: cycles,
dangling inputs, duplicate names, wrong-rank or zero-size weights, huge dims, unknown domains and ops,
If/Loop/Scan subgraphs, and external data that is missing, truncated or points outside the model folder
(`files` receives the extra files of the input folder). `fuzzing.make_case` combines them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """One to eight byte-level edits: flips, overwrites, truncation, insertions, duplicated chunks."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        if not buf:
            break
        kind = int(rng.integers(0, 7))
        pos = int(rng.integers(0, len(buf)))
        if kind == 0:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            buf[pos] = int(rng.integers(0, 256))
        elif kind == 2:
            del buf[pos:]
        elif kind == 3:
            buf[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        elif kind == 4:
            end = min(len(buf), pos + int(rng.integers(1, 64)))
            buf[pos:pos] = buf[pos:end]
        elif kind == 5:
            end = min(len(buf), pos + int(rng.integers(1, 32)))
            buf[pos:end] = b"\xff" * (end - pos)  # varints that never end / huge lengths
        else:
            end = min(len(buf), pos + int(rng.integers(1, 256)))
            del buf[pos:end]
    return bytes(buf)


def pick(rng: np.random.Generator, seq):
    """A uniformly drawn element of `seq`."""
    return seq[int(rng.integers(0, len(seq)))]


def _node(m: onnx.ModelProto, rng) -> onnx.NodeProto | None:
    return pick(rng, m.graph.node) if len(m.graph.node) else None


def _init(m: onnx.ModelProto, rng) -> onnx.TensorProto | None:
    return pick(rng, m.graph.initializer) if len(m.graph.initializer) else None


def h_cycle(m, rng, files):
    nodes = m.graph.node
    if len(nodes) >= 2:
        i = int(rng.integers(0, len(nodes) - 1))
        j = int(rng.integers(i, len(nodes)))
        if nodes[i].input and nodes[j].output:
            nodes[i].input[0] = nodes[j].output[0]


def h_dangling(m, rng, files):
    n = _node(m, rng)
    if n is not None and n.input:
        n.input[int(rng.integers(0, len(n.input)))] = "does_not_exist"


def h_duplicate_output(m, rng, files):
    if len(m.graph.node) >= 2:
        a, b = pick(rng, m.graph.node), pick(rng, m.graph.node)
        if a.output and b.output:
            b.output[0] = a.output[0]


def h_duplicate_node_name(m, rng, files):
    for n in m.graph.node:
        n.name = "same"


def h_duplicate_initializer(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        dup = m.graph.initializer.add()
        dup.CopyFrom(t)
        dup.dims[:] = list(dup.dims)[::-1] or [1]


def h_duplicate_input(m, rng, files):
    if m.graph.input:
        m.graph.input.add().CopyFrom(m.graph.input[0])


def h_wrong_rank(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        dims = list(t.dims)
        t.dims[:] = [int(np.prod(dims))] if len(dims) != 1 else [1, dims[0]] if dims else [1]


def h_zero_dim_weight(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.dims:
        t.dims[int(rng.integers(0, len(t.dims)))] = 0
        t.ClearField("raw_data")
        for f in ("float_data", "int64_data", "int32_data", "double_data"):
            t.ClearField(f)


def h_zero_dim_input(m, rng, files):
    if m.graph.input:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(0, len(dims)))].dim_value = 0


def h_huge_input_dim(m, rng, files):
    if m.graph.input:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            dims[int(rng.integers(0, len(dims)))].dim_value = int(pick(rng, [2**31, 2**40, 2**62]))


def h_huge_init_dims(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        t.dims[:] = [2**31, 2**31][: max(1, len(t.dims))]


def h_negative_dim(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.dims:
        t.dims[0] = -3


def h_unknown_domain(m, rng, files):
    n = _node(m, rng)
    if n is not None:
        n.domain = "com.example.evil"
        if rng.random() < 0.5:
            m.opset_import.add(domain="com.example.evil", version=1)


def h_unknown_op(m, rng, files):
    n = _node(m, rng)
    if n is not None:
        n.op_type = pick(rng, ["NotAnOp", "Conv", "MatMul", "Reshape", "Add", "Softmax", "Gather", ""])


def h_bad_attribute(m, rng, files):
    n = _node(m, rng)
    if n is not None:
        if n.attribute:
            a = pick(rng, n.attribute)
            value = pick(rng, [1.5, "text", [-1, -1], 10**9, -7])
            name = a.name
            n.attribute.remove(a)
            n.attribute.append(helper.make_attribute(name, value))
        else:
            n.attribute.append(helper.make_attribute("axis", int(rng.integers(-9, 9))))


def h_bad_dtype(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        t.data_type = int(pick(rng, [0, TensorProto.STRING, TensorProto.INT4, TensorProto.DOUBLE, 999]))


def h_string_weight(m, rng, files):
    t = _init(m, rng)
    if t is not None:
        new = helper.make_tensor(t.name, TensorProto.STRING, [2], [b"a", b"b"])
        t.CopyFrom(new)


def h_opset(m, rng, files):
    version = int(pick(rng, [1, 6, 99, 0]))
    del m.opset_import[:]
    if version:
        m.opset_import.add(domain="", version=version)


def h_ir_version(m, rng, files):
    m.ir_version = int(pick(rng, [0, 1, 3, 99]))


def h_no_outputs(m, rng, files):
    del m.graph.output[:]


def h_output_not_produced(m, rng, files):
    if m.graph.output:
        m.graph.output[0].name = "nobody_makes_this"


def h_empty_graph(m, rng, files):
    del m.graph.node[:]


def h_shuffle_nodes(m, rng, files):
    nodes = list(m.graph.node)
    order = rng.permutation(len(nodes))
    del m.graph.node[:]
    m.graph.node.extend(nodes[i] for i in order)


def h_wrong_weight_values(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.data_type == TensorProto.FLOAT and t.raw_data:
        arr = np.frombuffer(t.raw_data, np.float32).copy()
        arr[:] = pick(rng, [np.nan, np.inf, 0.0, -0.0, 1e38])
        t.raw_data = arr.tobytes()


def h_truncated_weight(m, rng, files):
    t = _init(m, rng)
    if t is not None and t.raw_data:
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]


def _subgraph_of(m: onnx.ModelProto, rng, kind: str) -> None:
    """Move a slice of the main graph into an If/Loop/Scan body that reads outer-scope tensors."""
    g = m.graph
    if not g.node or not g.input:
        return
    x = g.input[0].name
    body_out = "sub_out"
    inner = helper.make_node("Identity", [x], [body_out], name="inner_identity")
    if kind == "If":
        cond = numpy_helper.from_array(np.array(True), "fuzz_cond")
        g.initializer.append(cond)
        branch = helper.make_graph([inner], "branch", [], [helper.make_tensor_value_info(body_out, 1, None)])
        node = helper.make_node("If", ["fuzz_cond"], ["if_out"], then_branch=branch, else_branch=branch)
        produced = "if_out"
    elif kind == "Loop":
        g.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "fuzz_trip"))
        g.initializer.append(numpy_helper.from_array(np.array(True), "fuzz_cond"))
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", x], ["v_out"])],
            "body",
            [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", 1, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", 1, None)],
        )  # fmt: skip
        node = helper.make_node("Loop", ["fuzz_trip", "fuzz_cond", x], ["if_out"], body=body)
        produced = "if_out"
    else:
        body = helper.make_graph(
            [helper.make_node("Identity", ["s_in"], ["s_out"])], "scan_body",
            [helper.make_tensor_value_info("s_in", 1, None)], [helper.make_tensor_value_info("s_out", 1, None)],
        )  # fmt: skip
        node = helper.make_node("Scan", [x], ["if_out"], body=body, num_scan_inputs=1)
        produced = "if_out"
    # Feed the subgraph result into the first consumer of x.
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == x:
                n.input[k] = produced
                g.node.insert(0, node)
                return


def h_if(m, rng, files):
    _subgraph_of(m, rng, "If")


def h_loop(m, rng, files):
    _subgraph_of(m, rng, "Loop")


def h_scan(m, rng, files):
    _subgraph_of(m, rng, "Scan")


def _externalize(m: onnx.ModelProto, files: dict[str, bytes], location: str = "model.onnx.data") -> list:
    """Move every initializer over 256 bytes into `files[location]`; returns the moved tensors."""
    blob = bytearray()
    moved = []
    for t in m.graph.initializer:
        if t.raw_data and len(t.raw_data) > 256:
            offset = len(blob)
            blob += t.raw_data
            length = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            moved.append(t)
    files[location] = bytes(blob)
    return moved


def _set_location(t, value):
    for e in t.external_data:
        if e.key == "location":
            e.value = value


def h_external_ok(m, rng, files):
    _externalize(m, files)


def h_external_missing(m, rng, files):
    _externalize(m, files)
    files.pop("model.onnx.data", None)


def h_external_escape(m, rng, files):
    moved = _externalize(m, files)
    if moved:
        _set_location(pick(rng, moved), pick(rng, ["../../etc/passwd", "/etc/passwd", "../outside.bin",
                                                      "sub/../../../x", "C:\\\\evil", "//etc/shadow"]))


def h_external_symlink(m, rng, files):
    moved = _externalize(m, files)
    if moved:
        _set_location(pick(rng, moved), "link.bin")
        files["__link__:link.bin"] = b"/etc/passwd"


def h_external_bad_range(m, rng, files):
    moved = _externalize(m, files)
    if moved:
        t = pick(rng, moved)
        for e in t.external_data:
            if e.key == pick(rng, ["offset", "length"]):
                e.value = pick(rng, ["-5", "99999999999", "abc", "0", ""])


def h_external_truncated(m, rng, files):
    _externalize(m, files)
    data = files.get("model.onnx.data", b"")
    files["model.onnx.data"] = data[: len(data) // 3]


HOSTILE = {
    name.removeprefix("h_"): fn for name, fn in sorted(globals().items()) if name.startswith("h_") and callable(fn)
}

