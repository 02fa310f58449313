"""Export a small Keras model (Conv1D(k=1) "method 2" and a full-span Conv1D) with tf2onnx,
rewrite it with onnx-rewrite, verify it and print the result.

Needs TensorFlow, tf2onnx and Keras (about 1 GB), which onnx-rewrite itself does not:

    pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 keras
    python examples/keras_export.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the .onnx files [default: a temp folder]")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="onnx-rewrite-keras-"))
    out.mkdir(parents=True, exist_ok=True)

    import keras
    import tensorflow as tf
    import tf2onnx

    import rewriter

    keras.utils.set_random_seed(0)
    frames, frame_len, n = 10, 32, 64
    inp = keras.Input((frames, frame_len), batch_size=None, name="x")
    h = keras.layers.Conv1D(n, kernel_size=1, name="method2")(inp)  # Dense(N) on the last axis
    h = keras.layers.Activation("relu")(h)
    y = keras.layers.Conv1D(n, kernel_size=frames, name="fullspan")(h)  # one output position
    model = keras.Model(inp, y)

    path = out / "keras_model.onnx"
    spec = (tf.TensorSpec((None, frames, frame_len), tf.float32, name="x"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=15, output_path=str(path))

    result = rewriter.optimize(path)
    report = result.save(out / "keras_model.rewritten.onnx")
    x = np.random.default_rng(0).standard_normal((3, frames, frame_len)).astype(np.float32)
    print(f"exported {path}; keras output shape {tuple(model(x).shape)}")
    print(f"ops before: {report.input.op_counts}")
    print(f"ops after:  {report.output.op_counts if report.output else None}")
    for r in report.rewrites:
        print(f"  {r.status:11} {r.rule} at {r.nodes[0]}")
    verification = report.sections.get("verification")
    print(f"verified: {bool(verification) if verification is not None else 'nothing to verify'}")


if __name__ == "__main__":
    main()
