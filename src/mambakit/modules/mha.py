"""Official import path `mamba_ssm.modules.mha` -> mambakit."""
from .attention import MHA  # noqa: F401
