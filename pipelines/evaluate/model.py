"""What an evaluation's (and batch decoding's) `model` names, turned into the model and what training recorded
with it: an exported directory, a training checkpoint, an MLflow model directory, or an MLflow runs:/ or models:/
URI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from infgen.models import WEIGHTS_NAME, InfGen
from pipelines import checkpoint
from pipelines.holdout import RECORD, HoldoutRecord


def model_directory(source: str, tracking_uri: Optional[str] = None) -> Path:
    """The local directory of a model: `source` itself, or what an MLflow runs:/…/model or models:/name/version
    (or @alias) URI downloads to; for an MLflow model directory, its infgen artifact (infgen/pyfunc.py)."""
    if source.startswith(("runs:/", "models:/")):
        import mlflow

        if tracking_uri:  # the model registry follows it (download_artifacts' own tracking_uri leaves it behind)
            mlflow.set_tracking_uri(tracking_uri)
        source = mlflow.artifacts.download_artifacts(source)
    path = Path(source)
    if (path / "MLmodel").is_file():  # an MLflow model, as training logs it (infgen/pyfunc.py): its artifact
        path = path / infgen_artifact(path / "MLmodel")
    return path


def infgen_artifact(mlmodel: str | Path) -> str:
    """Where an MLflow model, as training logs it (infgen/pyfunc.py), keeps the exported InfGen directory: its
    path relative to the MLflow model's directory, read from the MLmodel file."""
    from mlflow.models import Model

    from infgen.pyfunc import ARTIFACT

    return Model.load(str(mlmodel)).flavors["python_function"]["artifacts"][ARTIFACT]["path"]


def load_model(source: str, tracking_uri: Optional[str] = None) -> InfGen:
    """An exported model directory, a training checkpoint directory (its EMA weights), an MLflow model
    directory, or an MLflow runs:/…/model or models:/name/version (or @alias) URI (downloaded first). Raises
    ValueError for anything else."""
    path = model_directory(source, tracking_uri)
    if (path / WEIGHTS_NAME).is_file():
        return InfGen.from_pretrained(path)
    if checkpoint.is_checkpoint(path):
        return checkpoint.load_model(path)
    raise ValueError(f"model {source}: neither an exported model ({WEIGHTS_NAME}) nor a training checkpoint "
                     f"({checkpoint.STATE_FILE}), nor an MLflow runs:/ or models:/ URI")


def holdout_record(source: str, tracking_uri: Optional[str] = None) -> Optional[HoldoutRecord]:
    """The split the model was trained with (pipelines.holdout.RECORD, which training writes into the exported
    model, and so into its MLflow model, and beside its checkpoints), or None for a model without one. Of an
    MLflow runs:/ or models:/ URI only MLmodel and the record are downloaded, not the weights (this runs on the
    driver). Raises ValueError for a record that does not read."""
    if source.startswith(("runs:/", "models:/")):
        import mlflow
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        base = source.rstrip("/")
        folder = infgen_artifact(mlflow.artifacts.download_artifacts(f"{base}/MLmodel"))
        try:
            return HoldoutRecord.read(mlflow.artifacts.download_artifacts(f"{base}/{folder}/{RECORD}"))
        except (MlflowException, OSError):  # a model logged without one
            return None
    path = model_directory(source, tracking_uri)
    for candidate in (path / RECORD, path.parent / RECORD if checkpoint.is_checkpoint(path) else None):
        if candidate is not None and candidate.is_file():
            return HoldoutRecord.read(candidate)
    return None


def exported_record(model: Optional[str]) -> Optional[dict]:
    """What training recorded beside an exported model directory (pipelines.checkpoint.EXPORTED), if anything."""
    if not model or "://" in model or model.startswith(("runs:/", "models:/")):
        return None
    path = Path(model).parent / checkpoint.EXPORTED
    return json.loads(path.read_text()) if path.is_file() else None
