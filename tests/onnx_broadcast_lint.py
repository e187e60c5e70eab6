"""Find the elementwise nodes of an ONNX graph that onnxruntime's CPU provider broadcasts one
value at a time (private test helper).

onnxruntime 1.32 broadcasts a rank-0 or rank-1 single value against a tensor whose last dim is 1
(a pooled ``(N, C, 1)``) element by element: a division of a ``(32, 2048, 1)`` tensor by such a
scalar takes 400 us where the same scalar shaped ``(1, 1, 1)`` takes 13 us, and a ``Where`` 755
against 146 (``docs/performance.md``). An exported graph should give its scalars the rank of
the tensor they meet.

>>> from onnx import helper as h, TensorProto as T
>>> x = h.make_tensor_value_info("x", T.FLOAT, ["N", 8, 1])
>>> y = h.make_tensor_value_info("y", T.FLOAT, None)
>>> two = h.make_tensor("two", T.FLOAT, [], [2.0])
>>> graph = h.make_graph([h.make_node("Div", ["x", "two"], ["y"])], "g", [x], [y], [two])
>>> slow_broadcasts(h.make_model(graph))
['Div(x, two): a single value of rank 0 against shape (N, 8, 1)']
"""

from __future__ import annotations

from typing import Any

BROADCASTING = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Where", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr",
    "PRelu", "Sum", "Mean",
}


def _shapes(graph: Any, known: dict[str, tuple | None]) -> None:
    for v in [*graph.input, *graph.output, *graph.value_info]:
        t = v.type.tensor_type
        known[v.name] = (tuple(d.dim_param or d.dim_value for d in t.shape.dim)
                         if t.HasField("shape") else None)
    for init in graph.initializer:
        known[init.name] = tuple(init.dims)


def _single_value(shape: tuple | None) -> bool:
    return shape is not None and len(shape) <= 1 and all(d == 1 for d in shape)


def _wide_with_unit_tail(shape: tuple | None) -> bool:
    """Rank 2 or more, last dim 1, and at least two other dims not known to be 1 (a ``(N, 1, 1)``
    tensor holds one value per sample: too few for the element-wise broadcast to matter)."""
    return (shape is not None and len(shape) >= 2 and shape[-1] == 1
            and sum(d != 1 for d in shape) >= 2)


def _walk(graph: Any, known: dict[str, tuple | None], found: list[str]) -> None:
    _shapes(graph, known)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    known[node.output[0]] = tuple(a.t.dims)
        for a in node.attribute:
            if a.g.node:
                _walk(a.g, dict(known), found)
        if node.op_type not in BROADCASTING:
            continue
        shapes = [known.get(i) for i in node.input]
        wide = known.get(node.output[0]) or max(
            (s for s in shapes if s is not None), key=len, default=None)
        if not _wide_with_unit_tail(wide):
            continue
        for shape in shapes:
            if _single_value(shape):
                dims = ", ".join(str(d) for d in wide)
                found.append(f"{node.op_type}({', '.join(node.input)}): a single value of rank "
                             f"{len(shape)} against shape ({dims})")
                break


def slow_broadcasts(model: Any) -> list[str]:
    """The elementwise nodes of ``model`` (an ``onnx.ModelProto``, shapes inferred here) that
    meet a tensor ending in a unit dim with a single value of rank 0 or 1."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    found: list[str] = []
    _walk(inferred.graph, {}, found)
    return found
