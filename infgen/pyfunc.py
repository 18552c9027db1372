"""InfGen as an MLflow pyfunc model (MLflow 3's models-from-code file: logged as is, never pickled).

    model = mlflow.pyfunc.load_model("models:/infgen-demo/1")
    images = model.predict(latents, params={"height": 768, "width": 1024})   # (B, 768, 1024, 3) uint8

The logged model holds this file, the infgen package (code_paths) and the exported model directory (the
artifact `infgen`: config.json + model.safetensors); loading it needs torch, numpy and safetensors, not this
repository. Input: float32 latents (B, C, h, w) as a diffusion model returns them (already multiplied by the
VAE's scaling factor; MLflow enforces the signature's float32: cast fp16 latents first). Params: `height`, `width` in pixels
(0: the VAE's native size, 8× the latent) and `tile` (output pixels per tile, a multiple of 8; 0: untiled).
Output: RGB images (B, height, width, 3), uint8.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

ARTIFACT = "infgen"  # the exported model directory's key in the logged model's artifacts
PARAMS = {"height": 0, "width": 0, "tile": 0}


def signature(latent_channels: int):
    """The pyfunc signature: float32 latents (-1, C, -1, -1) in, uint8 images (-1, -1, -1, 3) out, PARAMS."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, latent_channels, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          params=ParamSchema([ParamSpec(k, "long", v) for k, v in PARAMS.items()]))


class InfGenModel(mlflow.pyfunc.PythonModel):
    """Decodes latents to images of the requested size with the logged InfGen (see the module docstring)."""

    def load_context(self, context) -> None:
        from infgen.models import InfGen

        self.model = InfGen.from_pretrained(context.artifacts[ARTIFACT]).eval()

    # model_input's hint is np.ndarray, one MLflow derives no signature from (the explicit one stands) and that
    # stops its advice to add type hints at every import of this file
    def predict(self, context, model_input: np.ndarray, params=None):
        """float32 latents (B, C, h, w) → uint8 images (B, height, width, 3); see the module docstring."""
        p = {**PARAMS, **(params or {})}
        latents = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        h, w = latents.shape[-2:]
        size = (int(p["height"]) or 8 * h, int(p["width"]) or 8 * w)
        images = self.model.decode(latents, size, tile=int(p["tile"]) or None)
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


mlflow.models.set_model(InfGenModel())
