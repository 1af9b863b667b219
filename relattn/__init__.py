"""relattn: multi-head attention with 2-D decomposed relative position embeddings.

The attention of SAM's ViT image encoder (also ViTDet, DeepSeek-OCR's encoder,
MViTv2), without PyTorch: numpy on the CPU (numba kernels), CuPy on the GPU
(a fused CUDA kernel), other frameworks through DLPack.
"""

from relattn import backends
from relattn.checkpoint import (
    AttentionLayerInfo,
    attention_layers,
    load_checkpoint,
    resize_checkpoint_tables,
    save_checkpoint,
)
from relattn.functional import AttentionPlan, BackendError, explain, plan, rel_pos_attention
from relattn.autodiff import rel_pos_attention_vjp
from relattn.module import Attention
from relattn.precision import get_gpu_float32_mode, gpu_float32_mode, set_gpu_float32_mode
from relattn.relpos import decomposed_rel_pos, get_rel_pos, resize_rel_pos
from relattn.window import window_partition, window_unpartition

__version__ = "0.1.0"

# Optional framework bridges, imported on first access (``relattn.torch``), never by
# ``import relattn``: each imports its framework.
_LAZY_SUBMODULES = frozenset({"torch", "jax"})


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Attention",
    "AttentionLayerInfo",
    "AttentionPlan",
    "BackendError",
    "attention_layers",
    "load_checkpoint",
    "resize_checkpoint_tables",
    "save_checkpoint",
    "set_gpu_float32_mode",
    "backends",
    "decomposed_rel_pos",
    "explain",
    "get_gpu_float32_mode",
    "get_rel_pos",
    "gpu_float32_mode",
    "plan",
    "rel_pos_attention",
    "rel_pos_attention_vjp",
    "resize_rel_pos",
    "window_partition",
    "window_unpartition",
]
