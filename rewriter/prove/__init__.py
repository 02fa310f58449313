"""Prove: inputs and shapes to run, run both models on onnxruntime, compare, bisect and roll back."""
