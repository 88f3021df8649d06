"""Official import path `mamba_ssm.ops.triton.ssd_combined` -> mambakit."""
from ..ssd import mamba_chunk_scan_combined  # noqa: F401
from ..ssd.split_conv1d_scan import mamba_split_conv1d_scan_combined  # noqa: F401
