"""attnserve's online half: onnxruntime + grpcio + prometheus-client, no torch."""

__version__ = "0.3.0"
