"""The model-agnostic trainer on a toy model: config validation, batches from a generator (as on-policy methods
make them), callbacks, rank sharding of a fixed dataset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from envs.errors import TrafficGymError
from training.trainer import Callback, SampleBatches, TrainConfig, Trainer, Validation


@dataclass(frozen=True)
class PairBatch:
    x: torch.Tensor  # (N, 2)
    y: torch.Tensor  # (N,)

    def to(self, device):
        return PairBatch(self.x.to(device), self.y.to(device))


class Line(torch.nn.Module):
    """y = w . x + b, with a summed squared error as its loss."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def loss(self, batch: PairBatch):
        err = self.lin(batch.x)[:, 0] - batch.y
        return (err ** 2).sum(), len(batch.y), {"abs_err": float(err.detach().abs().mean())}


def save_line(model):
    return "line", {}


def generated(model: Line, seed: int = 0, limit: int | None = None):
    """Batches made one at a time while training, where the current model is worst (the inputs of the largest
    error among 64 candidates) — the shape of on-policy data, which depends on the policy being trained."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    while limit is None or n < limit:
        x = torch.randn(64, 2, generator=g)
        y = 3.0 * x[:, 0] - 2.0 * x[:, 1] + 0.5
        with torch.no_grad():
            worst = (model.lin(x)[:, 0] - y).abs().argsort(descending=True)[:32]
        yield PairBatch(x[worst], y[worst])
        n += 1


def test_train_config_is_frozen_and_validated(tmp_path):
    cfg = TrainConfig(out=str(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    for bad, match in [({"max_steps": 0}, "max_steps"), ({"batch_size": 1.5}, "batch_size"),
                       ({"log_every": True}, "log_every"), ({"ckpt_every": -1}, "ckpt_every"),
                       ({"lr": 0.0}, "lr"), ({"grad_clip": -1.0}, "grad_clip"),
                       ({"weight_decay": -0.1}, "weight_decay"), ({"final_lr_fraction": 1.5}, "final_lr_fraction"),
                       ({"device": "gpu7"}, "device")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(out=str(tmp_path), **bad)


def test_a_model_without_a_loss_is_refused(tmp_path):
    with pytest.raises(TypeError, match="no loss"):
        Trainer(torch.nn.Linear(2, 1), [], TrainConfig(out=str(tmp_path)), save_line)


def test_learns_from_batches_generated_while_training(tmp_path):
    model = Line()
    cfg = TrainConfig(out=str(tmp_path), max_steps=300, lr=0.05, progress=False, ckpt_every=0, grad_clip=10.0)
    history = Trainer(model, generated(model), cfg, save_line).fit()
    assert len(history) == 300
    first, last = np.mean([h["loss"] for h in history[:10]]), np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.01 * first
    torch.testing.assert_close(model.lin.weight.detach(), torch.tensor([[3.0, -2.0]]), atol=0.05, rtol=0)
    assert (tmp_path / "model.safetensors").exists()


def test_data_that_runs_out_says_so(tmp_path):
    model = Line()
    cfg = TrainConfig(out=str(tmp_path), max_steps=5, progress=False, ckpt_every=0)
    with pytest.raises(TrafficGymError, match="ran out after step 3 of 5"):
        Trainer(model, generated(model, limit=3), cfg, save_line).fit()


def test_callbacks_validate_and_stop(tmp_path):
    model = Line()
    calls = []

    class StopAt(Callback):
        def on_train_start(self, trainer):
            calls.append("start")

        def on_step_end(self, trainer, out):
            return trainer.step == 7

        def on_train_end(self, trainer):
            calls.append(("end", trainer.step))

    cfg = TrainConfig(out=str(tmp_path), max_steps=100, progress=False, ckpt_every=0)
    trainer = Trainer(model, generated(model), cfg, save_line,
                      callbacks=[Validation(lambda m: {"w0": float(m.lin.weight[0, 0].detach())}, every=3), StopAt()])
    history = trainer.fit()
    assert trainer.step == 7
    assert calls == ["start", ("end", 7)]
    steps = [json.loads(line)["step"] for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 7]  # every 3 steps, and after the last
    assert [h["step"] for h in history if "val/w0" in h] == [3, 6, 7]
    with pytest.raises(ValueError, match="every must be >= 0"):
        Validation(lambda m: {}, every=-1)


def test_sample_batches_shard_each_global_batch_by_rank():
    samples = list(range(10))
    ranks = [SampleBatches(samples, list, 4, seed=3, rank=r, world=2) for r in range(2)]
    whole = SampleBatches(samples, list, 4, seed=3, rank=0, world=1)
    for _ in range(6):  # past an epoch boundary
        parts = [b.next_samples() for b in ranks]
        glob = whole.next_samples()
        assert parts[0] == glob[0::2]
        assert parts[1] == glob[1::2]
    assert whole.state_dict() == {"epoch": 2, "cursor": 4}
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        SampleBatches(samples, list, 4, rank=0, world=3)
    with pytest.raises(TrafficGymError, match="No training samples"):
        SampleBatches([], list, 4)
