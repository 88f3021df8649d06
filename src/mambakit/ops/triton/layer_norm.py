"""Official import path `mamba_ssm.ops.triton.layer_norm` (1.x: `layernorm`) -> mambakit."""
from ..norms import RMSNorm, rms_norm_fn, rms_norm_ref  # noqa: F401
