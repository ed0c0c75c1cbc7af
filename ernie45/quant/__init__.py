"""Weight quantization: int8 / int4 / 2-bit group-wise schemes, quantized modules, quantize-on-load.

- ``math``: pure quantize / dequantize / pack functions and the CPU int4 kernel layout;
- ``scheme``: ``QuantConfig`` (what each class of weight gets), stored in checkpoint metadata;
- ``modules``: ``QuantLinear`` and ``QuantExperts`` with decode kernels and a dequantize path;
- ``quantize``: ``quantize_model(model, "int4")`` swaps modules by name;
- ``gptq``: calibrated quantization (``quantize_model(..., calibration=ids)`` with method "gptq");
- ``load``: quantize-on-load and quantized checkpoints (used by ``ernie45.load_model``/``save_model``).
"""

from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight
from ernie45.quant.quantize import quantize_model, quantized_nbytes
from ernie45.quant.scheme import QuantConfig, TensorScheme

__all__ = ["QWeight", "QuantConfig", "QuantExperts", "QuantLinear", "TensorScheme", "quantize_model",
           "quantized_nbytes"]
