"""Trunk backends: the same ResNet-50 trunk run by PyTorch, ONNX Runtime or OpenVINO.

The trunk is ~99 % of the compute. Attention, pooling, head and the Grad-CAM backward
stay in PyTorch (see ``cam.py``: the trunk runs once without autograd), so any backend
that turns a gray batch into the trunk's feature map and layer3's texture statistics
(:class:`~.base.Trunk`) serves both ``predict`` and ``explain``.
``tests/model/test_backends.py`` proves they agree.

This module is the registry: the names ``Settings``, the CLI and the benches accept.
It imports nothing heavy, so ``--help`` and the contract stay light; one file per
runtime holds its class, and :mod:`.factory` builds the one a name asks for.
"""

# name -> what it is; ``auto`` picks at start-up (factory.make_trunk)
BACKENDS: dict[str, str] = {
    "auto": "the fastest of ONNX Runtime, OpenVINO and, where `steelsight quantize` passed, OpenVINO int8 on CPU "
            "(timed once per machine); PyTorch on GPU",
    "torch": "PyTorch, BatchNorm folded, channels-last",
    "torch-fp16": "PyTorch in half precision: the GPU's tensor-core path",
    "torch-bf16": "PyTorch in bfloat16: the GPU's tensor cores with float32's range",
    "onnxruntime": "ONNX Runtime's CPU provider on the exported trunk",
    "openvino": "OpenVINO's CPU plugin on the exported trunk, float32",
    "openvino-int8": "the trunk quantized to int8 by `steelsight quantize`, on OpenVINO (CPU)",
}
BACKEND_NAMES = tuple(BACKENDS)
CPU_RUNTIMES = ("onnxruntime", "openvino")  # the exported-graph runtimes ``auto`` chooses between on CPU
# ``auto`` adds it to those only for a checkpoint whose parity file says it passed (factory.int8_eligible)
INT8_RUNTIME = "openvino-int8"
