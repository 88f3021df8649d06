"""Official import path `mamba_ssm.modules.mlp` -> mambakit."""
from .block import GatedMLP  # noqa: F401
