"""Release: verified merges, export, ONNX, the model card, the registry, predictions with registered models."""
