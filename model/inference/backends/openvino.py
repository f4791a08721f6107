"""The exported trunk compiled by OpenVINO (``openvino``)."""

from __future__ import annotations

from pathlib import Path

import torch


class OpenVinoTrunk:
    """The exported trunk compiled by OpenVINO's CPU plugin, in float32.

    The plugin would run bfloat16 on CPUs with AVX512-BF16 or AMX (probabilities off by
    up to 0.14 in bench/model_throughput.py), hence the precision hint; it would also pin
    its threads to cores, which two workers on one machine must not both do.
    """

    name = "openvino"

    def __init__(self, path: Path, size: int, threads: int | None = None, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({"gray": [-1, 1, size, size]})  # batch stays dynamic; the side is the checkpoint's
        self.model = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": False})
        self.path = path

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model({"gray": x.detach().cpu().numpy()})
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])
