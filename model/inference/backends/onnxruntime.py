"""The exported trunk run by ONNX Runtime (``onnxruntime``)."""

from __future__ import annotations

from pathlib import Path

import torch


class OnnxRuntimeTrunk:
    """An exported trunk run by ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning pool threads steal the cores that torch (Grad-CAM) and other workers need next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.runner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, texture = self.runner.run(None, {"gray": x.detach().cpu().numpy()})
        return torch.from_numpy(features), torch.from_numpy(texture)
