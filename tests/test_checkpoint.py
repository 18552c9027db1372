"""The training checkpoint layout (pipelines/checkpoint.py): what training saves is what resume, stage 2
(train.build_model) and the evaluate and decode stages (evaluate.load_model) read. No Ray."""

import random

import pytest
import torch

from infgen.losses import InfGenLoss, LossConfig
from infgen.models import InfGen
from infgen.training import InfGenTrainer, OptimConfig
from pipelines import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")


def make_trainer() -> InfGenTrainer:
    loss = InfGenLoss(LossConfig(lpips_random_backbone=True, disc_channels=16))
    return InfGenTrainer(InfGen.from_preset("tiny"), loss, OptimConfig(total_steps=10))


def test_what_training_saves_every_reader_loads(tmp_path):
    from pipelines.evaluate import load_model

    trainer = make_trainer()
    with torch.no_grad():  # EMA weights that differ from the model's and from a fresh model's
        for p in trainer.ema.parameters():
            p.add_(0.5)
    trainer.step = 7
    for rank in (0, 1):
        checkpoint.save(tmp_path, trainer, rank, "run-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng_rank0.pt", "rng_rank1.pt", checkpoint.STATE_FILE]
    assert checkpoint.is_checkpoint(tmp_path) and not checkpoint.is_checkpoint(tmp_path / "nothing")
    assert checkpoint.mlflow_run_id(tmp_path) == "run-1"
    expected = random.random()  # the stream after the save: a restore continues it

    ema = trainer.ema.state_dict()
    for model in (checkpoint.load_model(tmp_path), load_model(str(tmp_path)),
                  checkpoint.load_ema(tmp_path, InfGen.from_preset("tiny"))):
        assert model.config == trainer.ema.config
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in ema.items())
    assert not checkpoint.load_model(tmp_path).training

    resumed = make_trainer()
    random.random()
    assert checkpoint.restore(tmp_path, resumed, 1) == "run-1"
    assert resumed.step == 7 and random.random() == expected
    assert all(torch.equal(v, resumed.ema.state_dict()[k]) for k, v in ema.items())


def test_a_checkpoint_without_its_model_config_names_the_way_out(tmp_path):
    torch.save({"trainer": {"ema": InfGen.from_preset("tiny").state_dict()}}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match="without model_config.*exported model directory"):
        checkpoint.load_model(tmp_path)


def test_a_checkpoint_saved_before_newer_model_fields_loads_as_it_was_trained(tmp_path):
    """A model_config saved before latent_res_blocks / upsampler_norm existed builds the model it was (the same
    LEGACY_DEFAULTS as an exported config.json), not today's defaults; an unknown field is named."""
    from dataclasses import asdict

    from infgen.models import LEGACY_DEFAULTS

    legacy = InfGen.from_preset("tiny", **LEGACY_DEFAULTS)
    saved = {k: v for k, v in asdict(legacy.config).items() if k not in LEGACY_DEFAULTS}
    torch.save({"trainer": {"ema": legacy.state_dict()}, "model_config": saved}, tmp_path / checkpoint.STATE_FILE)
    model = checkpoint.load_model(tmp_path)
    assert model.config == legacy.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in legacy.state_dict().items())
    torch.save({"trainer": {"ema": legacy.state_dict()}, "model_config": {**saved, "depth": 3}},
               tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match=r"state.pt: unknown config fields \['depth'\]"):
        checkpoint.load_model(tmp_path)
