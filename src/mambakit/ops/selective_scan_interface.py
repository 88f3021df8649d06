"""Official import path `mamba_ssm.ops.selective_scan_interface` -> mambakit."""
from .selective_scan import selective_scan_fn, selective_scan_ref  # noqa: F401
