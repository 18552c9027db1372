"""infgen: decode Stable Diffusion VAE latents to images of any resolution (InfGen).

Plain PyTorch; never imports Ray (the Ray stages live in pipelines/ and jobs/).
"""

from .models import INFGEN_PRESETS, InfGen, InfGenConfig
from .upsample import iterative_decode, iterative_schedule
from .vae import FrozenVAE, load_vae

__all__ = ["INFGEN_PRESETS", "InfGen", "InfGenConfig", "FrozenVAE", "load_vae", "iterative_decode",
           "iterative_schedule"]
__version__ = "0.1.0"
