"""mambakit: Mamba selective state space models that install with pip and run on CPU and GPU.

A drop-in for the official `mamba-ssm` API: ``from mambakit import Mamba, Mamba2, MambaLMHeadModel, MambaConfig``.
"""

from .cache import InferenceParams
from .config import MambaConfig
from .models.lm import CausalLMOutput, MambaLMHeadModel, MixerModel
from .modules.block import Block, GatedMLP
from .modules.mamba1 import Mamba
from .modules.mamba2 import Mamba2
from .ops import selective_scan_fn

__version__ = "0.1.0"

__all__ = [
    "Mamba", "Mamba2", "MambaConfig", "MambaLMHeadModel", "MixerModel", "Block", "GatedMLP",
    "InferenceParams", "CausalLMOutput", "selective_scan_fn", "__version__",
]
