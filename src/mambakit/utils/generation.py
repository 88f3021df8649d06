"""Official import path `mamba_ssm.utils.generation` -> mambakit."""
from ..cache import InferenceParams  # noqa: F401
from ..inference.generate import decode  # noqa: F401
from ..inference.sampling import (  # noqa: F401
    modify_logit_for_repetition_penalty, modify_logits_for_min_p_filtering, modify_logits_for_top_k_filtering,
    modify_logits_for_top_p_filtering, sample)
