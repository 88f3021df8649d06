"""Official import path `mamba_ssm.ops.triton.ssd_combined` -> mambakit."""
from ..ssd import mamba_chunk_scan_combined  # noqa: F401
