"""Export: TorchScript, torch.export and ONNX writers (``writers``), and what an ONNX file holds (``onnx_info``)."""
