"""Official import path `mamba_ssm.ops.triton.layernorm_gated` -> mambakit (the gated RMSNorm)."""
from ..norms import RMSNormGated as RMSNorm  # noqa: F401
from ..norms import rmsnorm_fn  # noqa: F401
