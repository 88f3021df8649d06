"""Official import path `mamba_ssm.utils.generation` -> mambakit."""
from ..cache import InferenceParams  # noqa: F401
