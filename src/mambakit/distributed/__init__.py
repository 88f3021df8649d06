"""Distributed execution: tensor parallelism for Mamba-2 and hybrid language models (see tensor_parallel)."""

from .tensor_parallel import (DistEnv, TPMamba2, TPMHA, check_parallelizable, gather_grads, gather_state_dict,
                              load_full_state_dict, parallelize, setup_from_env)

__all__ = ["parallelize", "check_parallelizable", "gather_state_dict", "gather_grads", "load_full_state_dict",
           "setup_from_env", "DistEnv", "TPMamba2", "TPMHA"]
