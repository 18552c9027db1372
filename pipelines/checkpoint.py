"""A training checkpoint directory, as training writes it and every stage reads it:

  state.pt          rank 0's {"trainer": InfGenTrainer.state_dict() (model, ema, discriminator, optimisers,
                    schedulers, step), "mlflow_run_id": str | None, "model_config": asdict(InfGenConfig)}
  rng_rank<r>.pt    each rank's Python, NumPy and torch RNG states (resume continues their streams)

A stage that only needs the model reads the EMA weights (`load_ema`, `load_model`); an exported model
(InfGen.save_pretrained) is the other way to hand one over.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from infgen.losses import unwrap
from infgen.models import InfGen, config_from_dict
from infgen.training import InfGenTrainer

STATE_FILE = "state.pt"
# in a training run's directory, beside its checkpoints (pipelines.train writes them)
RUN_CONFIG = "run_config.json"  # what its checkpoints were trained with (train.check_resume)
EXPORTED = "exported.json"  # written after the export: step, config hash, MLflow run and model version
PathLike = Union[str, Path]


def is_checkpoint(directory: PathLike) -> bool:
    """True when `directory` holds a training checkpoint (its STATE_FILE)."""
    return (Path(directory) / STATE_FILE).is_file()


def save(directory: PathLike, trainer: InfGenTrainer, rank: int, run_id: Optional[str]) -> None:
    """This rank's part of a checkpoint into `directory`: rank 0 the trainer state, the MLflow run and the model
    config; every rank its RNG states."""
    directory = Path(directory)
    if rank == 0:
        torch.save({"trainer": trainer.state_dict(), "mlflow_run_id": run_id,
                    "model_config": asdict(unwrap(trainer.model).config)}, directory / STATE_FILE)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               directory / f"rng_rank{rank}.pt")


def restore(directory: PathLike, trainer: InfGenTrainer, rank: int) -> Optional[str]:
    """Load the trainer state of the checkpoint in `directory` into `trainer` and this rank's RNG states (when
    saved: a checkpoint of fewer ranks has none for the others); returns the MLflow run id it recorded."""
    directory = Path(directory)
    state = _read(directory)
    rng_file = directory / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    trainer.load_state_dict(state["trainer"])
    if rng:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    return state.get("mlflow_run_id")


def mlflow_run_id(directory: PathLike) -> Optional[str]:
    """The MLflow run the checkpoint in `directory` was logged to (None when tracking was off or unreachable)."""
    return _read(Path(directory)).get("mlflow_run_id")


def load_ema(directory: PathLike, model: InfGen) -> InfGen:
    """`model` with the checkpoint's EMA weights loaded (strict: a model of another config raises
    RuntimeError). Only tensors and plain values are unpickled."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["trainer"]["ema"])
    return model


def load_model(directory: PathLike) -> InfGen:
    """The checkpoint's EMA model, in eval mode, built from the config the checkpoint recorded. Raises
    ValueError for a checkpoint written before model_config was recorded."""
    state = _read(Path(directory))
    if "model_config" not in state:
        raise ValueError(f"{Path(directory) / STATE_FILE}: a checkpoint without model_config (written before it "
                         f"was recorded); evaluate the exported model directory instead")
    model = InfGen(config_from_dict(state["model_config"], str(Path(directory) / STATE_FILE)))
    model.load_state_dict(state["trainer"]["ema"])
    return model.eval()


def _read(directory: Path) -> dict[str, Any]:
    # the whole state, optimisers included, as training saved it (a checkpoint is trusted like the code)
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
