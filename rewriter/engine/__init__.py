"""The rewrite engine: load/save, graph, patterns, rules, the driver, the registry, shapes.

Knows nothing about any particular rule or about onnxruntime."""
