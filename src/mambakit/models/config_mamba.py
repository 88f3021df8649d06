"""Official import path `mamba_ssm.models.config_mamba` -> mambakit."""
from ..config import MambaConfig  # noqa: F401
