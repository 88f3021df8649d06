"""Official import path `mamba_ssm.models.mixer_seq_simple` -> mambakit."""
from .lm import MambaLMHeadModel, MixerModel, create_block  # noqa: F401
