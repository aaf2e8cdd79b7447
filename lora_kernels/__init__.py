"""lora_kernels: fused GPU kernels for LoRA fine-tuning, and what it takes to train with them.

Configuration
    LoRAConfig            the adapter's settings in PEFT's vocabulary (r, lora_alpha, target_modules, ...) plus
                          mode and init_A; validated; to/from PEFT's adapter_config.json (``lora_kernels.config``
                          also holds the shared rules: MODES, INITS, scaling, trainable_factors, math_dtype)
Layer
    FusedLoRALinear       nn.Linear replacement with a LoRA adapter on the fused kernels (modes AB, B, A; merge)
    FusedLoRALinear4bit   the same on a frozen 4-bit NF4 base (QLoRA: bitsandbytes Linear4bit or NF4Linear)
4-bit bases (``lora_kernels.quant``)
    NF4Tensor, quantize_nf4, NF4Linear, quantize_model   bitsandbytes' NF4 layout, without bitsandbytes
Functional ops
    lora_linear           y = x Wᵀ + b + s·(dropout(x) Aᵀ) Bᵀ, differentiable, fused forward and backward
    lora_linear_ref       the same in plain PyTorch (reference)
    dropout_mask          the dropout mask a seed stands for
    gemm_arrangement      force the GEMM arrangement ("fused", "split", "auto") inside a ``with`` block
    gemm_arrangement_report   what "auto" measured
    rsvd, rsvd_ref        batched randomized SVD (kernel path, reference)
    (LoRALinearFunction, the autograd Function behind lora_linear, is importable but left out of ``__all__``.)
Model surgery
    inject_lora           put FusedLoRALinear adapters into any model (PEFT's matching rules), freeze the rest
    lora_layers, named_lora_layers   find them
    merge_lora, unmerge_lora, unload_lora, trainable_parameters (-> TrainableSummary)
Adapter files (PEFT format, both ways)
    save_adapter, load_adapter
Existing PEFT models
    patch_peft, unpatch_peft, is_peft_patched   run a PeftModel's LoRA Linear layers on the fused kernels in place
Initialisations (``lora_kernels.init``)
    lora_one_init, lora_ga_init, pissa_init (-> InitReport of LayerReport), collect_gradients
Optimizers (``lora_kernels.optim``)
    PreconditionedAdamW, PreconditionedSGD   r×r-preconditioned updates of the LoRA factors; lora_pairs
Environment
    has_extension         whether the optional compiled extension ``lora_kernels._C`` is present
    logger                the package's logger
    (``lora_kernels.settings``: the run-time switches read from the environment.)
"""

from lora_kernels import _extension, config, init, model, modules, ops, optim, quant
from lora_kernels._backend import logger
from lora_kernels.config import LoRAConfig
from lora_kernels.init import InitReport, LayerReport, collect_gradients, lora_ga_init, lora_one_init, pissa_init
from lora_kernels.model import (TrainableSummary, inject_lora, load_adapter, lora_layers, merge_lora,
                                named_lora_layers, save_adapter, trainable_parameters, unload_lora, unmerge_lora)
from lora_kernels.model.peft_patch import is_peft_patched, patch_peft, unpatch_peft
from lora_kernels.modules import FusedLoRALinear, FusedLoRALinear4bit
from lora_kernels.ops import (LoRALinearFunction, dropout_mask, gemm_arrangement, gemm_arrangement_report, lora_linear,
                              lora_linear_ref)
from lora_kernels.ops.rsvd import rsvd, rsvd_ref
from lora_kernels.optim import PreconditionedAdamW, PreconditionedSGD, lora_pairs
from lora_kernels.quant import NF4Linear, NF4Tensor, quantize_model, quantize_nf4


def has_extension(device: str = "cpu") -> bool:
    """Whether the optional compiled extension ``lora_kernels._C`` serves ``device`` ("cpu" or "cuda").

    Without it everything still works: rsvd's batched k×k SVD falls back to torch.linalg (said once in the log).
    """
    return _extension.has_cuda() if str(device).startswith("cuda") else _extension.available()


__version__ = "0.1.0"
# LoRALinearFunction stays importable but out of __all__: pydoc would dump torch.autograd.Function's docs with it.
__all__ = ["FusedLoRALinear", "FusedLoRALinear4bit", "InitReport", "LayerReport", "LoRAConfig", "PreconditionedAdamW", "PreconditionedSGD",
           "TrainableSummary", "collect_gradients", "dropout_mask", "gemm_arrangement", "gemm_arrangement_report",
           "has_extension", "inject_lora", "is_peft_patched", "load_adapter", "logger", "lora_ga_init", "lora_layers", "lora_linear",
           "lora_linear_ref", "lora_one_init", "lora_pairs", "merge_lora", "named_lora_layers", "NF4Linear", "NF4Tensor",
           "patch_peft", "pissa_init", "quantize_model", "quantize_nf4",
           "rsvd", "rsvd_ref", "save_adapter", "trainable_parameters", "unload_lora", "unmerge_lora", "unpatch_peft",
           "__version__"]
