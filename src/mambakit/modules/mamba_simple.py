"""Official import path `mamba_ssm.modules.mamba_simple` -> mambakit."""
from .mamba1 import Mamba  # noqa: F401
