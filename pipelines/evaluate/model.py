"""What an evaluation's (and batch decoding's) `model` names, turned into the model: an exported directory, a
training checkpoint, an MLflow model directory, or an MLflow runs:/ or models:/ URI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from infgen.models import WEIGHTS_NAME, InfGen
from pipelines import checkpoint


def load_model(source: str, tracking_uri: Optional[str] = None) -> InfGen:
    """An exported model directory, a training checkpoint directory (its EMA weights), an MLflow model
    directory, or an MLflow runs:/…/model or models:/name/version (or @alias) URI (downloaded first)."""
    if source.startswith(("runs:/", "models:/")):
        import mlflow

        if tracking_uri:  # the model registry follows it (download_artifacts' own tracking_uri leaves it behind)
            mlflow.set_tracking_uri(tracking_uri)
        source = mlflow.artifacts.download_artifacts(source)
    path = Path(source)
    if (path / "MLmodel").is_file():  # an MLflow model, as training logs it (infgen/pyfunc.py): its artifact
        from mlflow.models import Model

        from infgen.pyfunc import ARTIFACT

        path = path / Model.load(str(path)).flavors["python_function"]["artifacts"][ARTIFACT]["path"]
    if (path / WEIGHTS_NAME).is_file():
        return InfGen.from_pretrained(path)
    if checkpoint.is_checkpoint(path):
        return checkpoint.load_model(path)
    raise ValueError(f"model {source}: neither an exported model ({WEIGHTS_NAME}) nor a training checkpoint "
                     f"({checkpoint.STATE_FILE}), nor an MLflow runs:/ or models:/ URI")


def exported_record(model: Optional[str]) -> Optional[dict]:
    """What training recorded beside an exported model directory (pipelines.train.EXPORTED), if anything."""
    from pipelines.train import EXPORTED

    if not model or "://" in model or model.startswith(("runs:/", "models:/")):
        return None
    path = Path(model).parent / EXPORTED
    return json.loads(path.read_text()) if path.is_file() else None
