"""The backbone alone, cut out of an exported model: the limit `linegate bench` measures against.

The cut is the model's own graph up to where the detector head begins, so the backbone runs
in exactly the runtime, precision and graph optimisations of the model it belongs to (FP16 and
INT8 variants included). Backbone = the nodes the torch exporter placed under the `backbone`
module scope and everything they depend on (input normalisation, quantize/dequantize nodes);
head = the rest.
"""
from __future__ import annotations

from pathlib import Path


def _backbone_nodes(model) -> tuple[list, list[str]]:
    """The backbone's nodes (graph order) and the names of the tensors where the detector head
    begins. Backbone = the nodes under the `backbone` module scope and everything they depend
    on (input normalisation, quantize/dequantize nodes); head = the rest. Graphs without the
    exporter's scopes are refused: guessing (say, every convolution) would count a head made
    of convolutions, FCDD's, as backbone and report a model/backbone ratio near 1."""
    from export.scopes import in_backbone  # here: `linegate run`'s parser imports this module

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    seeds = [n for n in graph.node if in_backbone(n)]
    if not seeds:
        raise ValueError("no node in a `backbone` module scope (the graph lost the exporter's metadata, or "
                         "was not exported by `linegate export onnx`): the backbone alone is not measured")
    inside: set[int] = set()
    todo = list(seeds)
    while todo:
        node = todo.pop()
        if id(node) in inside:
            continue
        inside.add(id(node))
        todo += [producer[name] for name in node.input if name in producer]
    outputs: list[str] = []
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        if id(node) in inside:
            outputs += [o for o in node.output if o in graph_outputs and o not in outputs]
            continue
        outputs += [name for name in node.input
                    if name in producer and id(producer[name]) in inside and name not in outputs]
    return [n for n in graph.node if id(n) in inside], outputs


def backbone_outputs(model) -> list[str]:
    """Names of the tensors where the detector head begins (see _backbone_nodes)."""
    return _backbone_nodes(model)[1]


def write_backbone_graph(model_path: Path, out_path: Path) -> list[str]:
    """The backbone alone as its own ONNX file: the model's nodes up to the head, unchanged."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    nodes, outputs = _backbone_nodes(model)
    typed = onnx.shape_inference.infer_shapes(model).graph
    known = {vi.name: vi for vi in [*typed.value_info, *typed.output, *typed.input]}
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(
        nodes, "backbone", list(model.graph.input),
        [known.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [t for t in model.graph.initializer if t.name in used])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    onnx.save(sub, str(out_path))
    return outputs
