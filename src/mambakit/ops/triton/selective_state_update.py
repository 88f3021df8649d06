"""Official import path `mamba_ssm.ops.triton.selective_state_update` -> mambakit."""
from ..state_update import selective_state_update, selective_state_update_ref  # noqa: F401
