"""The engine: onnxruntime sessions and routing, the model directory reader, batching logic and the batcher threads."""
