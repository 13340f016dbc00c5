"""linegate export: torch -> ONNX (+ parity), bundles."""
