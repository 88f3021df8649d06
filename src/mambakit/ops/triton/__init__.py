"""Official import paths `mamba_ssm.ops.triton.*` -> mambakit (aliases only: nothing here imports Triton)."""
