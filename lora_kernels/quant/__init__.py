"""4-bit NF4 base weights for QLoRA, in bitsandbytes' layout (bitsandbytes itself is optional, never imported here).

Format
    NF4Tensor             the packed codes, block scales (plain or double-quantized) and levels of an out×in weight
    nf4_code              the 16 NF4 levels as a tensor
    dequantize_nf4_ref    dense W from an NF4Tensor (pure PyTorch, bit-identical to bitsandbytes)
Quantizing
    quantize_nf4          a dense weight → NF4Tensor, value for value as bitsandbytes' quantize_4bit
    NF4Linear             a frozen 4-bit linear layer (from_linear, from_nf4, nf4_tensor, dequantize)
    quantize_model        replace a model's nn.Linear layers by NF4Linear in place
bitsandbytes layers
    is_bnb_linear4bit     whether a module is a bitsandbytes Linear4bit
    nf4_from_bnb          a quantized Linear4bit / Params4bit read as an NF4Tensor, without copies
"""

from lora_kernels.quant.bnb import is_bnb_linear4bit, nf4_from_bnb
from lora_kernels.quant.linear import NF4Linear, quantize_model
from lora_kernels.quant.nf4 import NF4Tensor, dequantize_nf4_ref, nf4_code
from lora_kernels.quant.quantize import quantize_nf4

__all__ = ["NF4Linear", "NF4Tensor", "dequantize_nf4_ref", "is_bnb_linear4bit", "nf4_code", "nf4_from_bnb",
           "quantize_model", "quantize_nf4"]
