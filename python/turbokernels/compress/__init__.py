"""Weight compression that uses more than the weight itself (pruning, calibrated quantization), as opposed to how
weights are stored (formats/)."""
from .gptq import HessianAccumulator, gptq_quantize, hessian_of
from .prune import is_24_sparse, prune_24
from .sparsegpt import sparsegpt_24, sparsegpt_24_int4

__all__ = ["prune_24", "is_24_sparse", "gptq_quantize", "hessian_of", "HessianAccumulator", "sparsegpt_24",
           "sparsegpt_24_int4"]
