"""Official 1.x import path `mamba_ssm.ops.triton.layernorm` -> mambakit."""
from .layer_norm import RMSNorm, rms_norm_fn, rms_norm_ref  # noqa: F401
