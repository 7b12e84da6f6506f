"""Export: a checkpoint's backbone as arcface_torch tensors, ONNX, the full head (python -m ds_face.export)."""
