"""Which module of the detector an exported ONNX node came from.

torch.onnx's exporter records each node's module path in its metadata; every detector module
holds its feature extractor as `self.backbone` (training/*.py), so "backbone" versus the rest
is where the detector head begins: the cut `linegate bench` measures the backbone alone at,
and the part reduced-precision variants keep in FP32 (export/precision.py).
"""
from __future__ import annotations

import ast

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
BACKBONE_SCOPE = "backbone"


def module_scope(node) -> str | None:
    """The top-level submodule an onnx NodeProto was exported from ("backbone", "head", ""
    for the detector's own forward); None where the exporter recorded none."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[1].split(".")[0] if len(scopes) > 1 else ""
    return None


def in_backbone(node) -> bool:
    return module_scope(node) == BACKBONE_SCOPE
