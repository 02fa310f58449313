"""Example onnx-rewrite plugin package."""
