"""A model-agnostic trainer: AdamW + cosine decay, gradient clipping, atomic resumable checkpoints, callbacks
(TensorBoard, progress bar, validation, your own), and data-parallel training under ``torchrun`` with PyTorch's
``DistributedDataParallel`` (gloo on CPU, nccl on GPU).

The model owns its loss (as in nanoGPT): ``model.loss(batch) -> (loss_sum, count, metrics)``, the *sum* of the
loss over the batch's ``count`` targets, and scalar metrics as means over those targets. The trainer divides by
the count summed over all processes, so N processes on N shards of a global batch take exactly the step one
process takes on the whole batch, and log what it logs (tested).

Data is any iterable of batches (objects with ``.to(device)``, e.g. ``agents.smart.TokenBatch``), each this
process's share of a global batch: a fixed dataset through ``SampleBatches`` (a seeded per-epoch permutation,
sharded by rank), or a generator that makes its batches while training (rollouts of the current policy, for
on-policy methods). An iterable with ``state_dict()`` / ``load_state_dict()`` is checkpointed with the model, so
``resume`` continues its order exactly.

Checkpoints (rank 0): ``DIR/last.safetensors`` every ``ckpt_every`` steps and at the end — the model's tensors,
the optimizer's (prefixed ``optim.``), and in the metadata the model config, step and data position
(``save_fn`` gives the agent name and config). ``resume=True`` continues from it. At the end,
``DIR/model.safetensors`` holds the weights alone (what an agent loads; a third of the size).

Callbacks (``Callback``: ``on_train_start``, ``on_step_end``, ``on_train_end``; the idea of Stable-Baselines3's):
the trainer adds the progress bar and TensorBoard logging itself (``TrainConfig.progress`` / ``log_every``);
``Validation(fn, every)`` runs a validation function; a callback's ``on_step_end`` returning True stops training.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from agents.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from envs.errors import CheckpointError, TrafficGymError

CHECKPOINT = "last.safetensors"
WEIGHTS = "model.safetensors"  # the final weights alone (no optimizer state): the file to share or ship


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping of one training run (validated on construction)."""

    out: str  # the run's folder: checkpoints, TensorBoard logs, val.jsonl
    max_steps: int = 1000
    batch_size: int = 4  # samples (scenes) per global batch, over all processes
    lr: float = 5e-4
    weight_decay: float = 0.01  # on weight matrices only (not on biases and norms)
    grad_clip: float = 0.5  # max global gradient norm
    final_lr_fraction: float = 0.01  # cosine decay to this fraction of lr
    log_every: int = 10  # TensorBoard scalars every this many steps (and at the last)
    ckpt_every: int = 200  # 0: only at the end
    seed: int = 0
    resume: bool = False
    progress: bool = True
    device: str = "cpu"

    def __post_init__(self):
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "log_every": self.log_every}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.ckpt_every, int) or self.ckpt_every < 0:
            raise ValueError(f"TrainConfig.ckpt_every must be an integer >= 0 (0: only at the end), got "
                             f"{self.ckpt_every!r}.")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"TrainConfig.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction!r}.")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"TrainConfig.device {self.device!r} is not a torch device (e.g. 'cpu', 'cuda:0').") \
                from e


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

class SampleBatches:
    """An endless iterable of this process's share of each global batch of a fixed list of samples.

    Each global batch is the next ``batch_size`` samples of a seeded per-epoch permutation; rank ``r`` of ``N``
    collates samples ``r, r + N, ...`` of it. With a ``group_fn`` every global batch holds samples of one group
    (the tokenized policy groups scenes by map: the map encoder then runs on one map per step); a group's
    remainder waits for another epoch. ``state_dict()`` is the position (epoch, cursor)."""

    def __init__(self, samples: list, collate: Callable, batch_size: int, seed: int = 0,
                 group_fn: Callable[[object], object] | None = None, rank: int | None = None,
                 world: int | None = None):
        if len(samples) == 0:
            raise TrafficGymError("No training samples: the split is empty (or every scene was filtered out).")
        if rank is None or world is None:
            rank, world = rank_and_world()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {world} processes.")
        self.samples, self.collate, self.batch_size, self.seed = samples, collate, batch_size, seed
        self.rank, self.world = rank, world
        self.groups = None
        if group_fn is not None:
            keys = [group_fn(x) for x in samples]
            self.groups = [np.flatnonzero([k == g for k in keys]) for g in dict.fromkeys(keys)]
            if all(len(g) < batch_size for g in self.groups):
                raise ValueError(f"No group of samples fills a batch of {batch_size}.")
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed + epoch)
        if self.groups is None:
            return rng.permutation(len(self.samples))
        # whole batches from one group each, in random order
        bs = self.batch_size
        chunks = [c for g in self.groups for c in rng.permutation(g)[:len(g) // bs * bs].reshape(-1, bs)]
        return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])

    def next_samples(self) -> list:
        """This rank's samples of the next global batch."""
        order = self._order(self.epoch)
        picked = []
        while len(picked) < self.batch_size:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order(self.epoch)
            picked.append(int(order[self.cursor]))
            self.cursor += 1
        return [self.samples[i] for i in picked[self.rank::self.world]]

    def __iter__(self) -> Iterator:
        while True:
            yield self.collate(self.next_samples())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ------------------------------------------------------------------------------------------------------------
# Callbacks
# ------------------------------------------------------------------------------------------------------------

class Callback:
    """Hooks into ``Trainer.fit``; every method is optional. ``on_step_end`` returning True stops training."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, out: dict) -> bool | None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


class Validation(Callback):
    """``fn(model) -> dict`` of scalars on rank 0 every ``every`` steps (0: only at the end) and after the last
    step; results go to the history (``val/`` keys), TensorBoard and ``DIR/val.jsonl``."""

    def __init__(self, fn: Callable[[torch.nn.Module], dict], every: int = 0):
        if every < 0:
            raise ValueError(f"Validation every must be >= 0 (0: only at the end), got {every}.")
        self.fn, self.every, self.last = fn, every, None

    def on_step_end(self, trainer: Trainer, out: dict) -> None:
        if self.every and trainer.step % self.every == 0:
            self._run(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last != trainer.step:
            self._run(trainer)

    def _run(self, trainer: Trainer) -> None:
        self.last = trainer.step
        if trainer.rank != 0:
            return
        result = self.fn(trainer.model)
        trainer.history.append({"step": trainer.step, **{f"val/{k}": v for k, v in result.items()}})
        if trainer.writer is not None:
            for k, v in result.items():
                trainer.writer.add_scalar(f"val/{k}", v, trainer.step)
        trainer.out.mkdir(parents=True, exist_ok=True)
        with (trainer.out / "val.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.step, **result}) + "\n")


_NOT_SHOWN = ("loss", "grad_norm", "lr", "targets", "tokens_per_s", "step", "wall_s")


class _ProgressBar(Callback):
    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.cfg.max_steps, initial=trainer.step, desc="train", unit="step",
                        dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, out: dict) -> None:
        self.bar.update(1)
        shown = {k: f"{v:.3f}" for k, v in out.items() if k not in _NOT_SHOWN}  # the model's own metrics
        self.bar.set_postfix(loss=f"{out['loss']:.3f}", **shown, tok_s=f"{out['tokens_per_s']:.0f}")

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


class _TensorBoard(Callback):
    def on_step_end(self, trainer: Trainer, out: dict) -> None:
        if trainer.step % trainer.cfg.log_every == 0 or trainer.step == trainer.cfg.max_steps:
            for k, v in out.items():
                trainer.writer.add_scalar(f"train/{k}", v, trainer.step)


# ------------------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------------------

class _Loss(torch.nn.Module):
    """The model's ``loss`` as a module's forward: DistributedDataParallel hooks forward / backward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


class Trainer:
    """Trains ``model`` (with a ``loss(batch)`` method) on the batches of ``data`` (see the module docstring).

    save_fn: ``model -> (agent name, config dict)`` for the checkpoints' metadata. callbacks: extra
    ``Callback`` objects, e.g. ``Validation``. Under ``torchrun`` (``torch.distributed`` initialised) the model
    is wrapped in ``DistributedDataParallel``; each process's ``data`` yields its own shard."""

    def __init__(self, model: torch.nn.Module, data: Iterable, cfg: TrainConfig,
                 save_fn: Callable[[torch.nn.Module], tuple[str, dict]], callbacks: Iterable[Callback] = ()):
        if not callable(getattr(model, "loss", None)):
            raise TypeError(f"{type(model).__name__} has no loss(batch) method: the trainer trains models that own "
                            "their loss, returning (loss summed over the batch, target count, metrics dict).")
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.model = model.to(self.device)
        self.data, self.save_fn = data, save_fn
        self.rank, self.world = rank_and_world()
        self.out = Path(cfg.out)
        self.step = 0
        # weight decay on weight matrices only; a model's ``lr_scales()`` ({name prefix: multiplier}) gives some
        # parameters their own learning rate (e.g. a head trained from scratch beside fine-tuned weights)
        scales = model.lr_scales() if callable(getattr(model, "lr_scales", None)) else {}
        groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}  # (decayed, lr multiplier)
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = next((v for k, v in scales.items() if name.startswith(k)), 1.0)
                groups.setdefault((p.dim() >= 2, float(scale)), []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[key], "weight_decay": cfg.weight_decay if key[0] else 0.0, "lr_scale": key[1]}
             for key in sorted(groups, key=lambda k: (not k[0], k[1]))], lr=cfg.lr)
        self.loss_module: torch.nn.Module = _Loss(self.model)
        if self.world > 1:
            # find_unused_parameters: a batch need not touch every parameter (e.g. the embedding of an agent type
            # no scene of the batch has); those get no gradient, as in one process
            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.callbacks = list(callbacks)
        self.history: list[dict] = []
        self.writer = None
        self._batches: Iterator | None = None

    # ---- schedule and data -------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = min(step / max(self.cfg.max_steps, 1), 1.0)
        low = self.cfg.final_lr_fraction
        return self.cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t)))

    def next_batch(self):
        """The next batch of ``data`` (this process's share), on the trainer's device."""
        if self._batches is None:
            self._batches = iter(self.data)
        try:
            batch = next(self._batches)
        except StopIteration:
            raise TrafficGymError(f"The training data ran out after step {self.step} of {self.cfg.max_steps}: give "
                                  "an endless iterable (e.g. SampleBatches) or fewer max_steps.") from None
        return batch.to(self.device)

    # ---- one step ----------------------------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
        loss_sum, count, metrics = self.loss_module(batch)
        total = torch.as_tensor(float(count), device=loss_sum.device)
        if self.world > 1:
            dist.all_reduce(total)
        # DistributedDataParallel averages the gradients over the processes: x world / global count makes the
        # result the gradient of the global mean
        loss = loss_sum * self.world / total.clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        # what is logged is the global batch's: the loss summed over processes, the metrics (per-target means)
        # weighted by each process's target count -- the numbers a single process would print
        logged = torch.as_tensor([float(loss_sum.detach())] + [float(v) * count for v in metrics.values()],
                                 dtype=torch.float64, device=loss_sum.device)
        if self.world > 1:
            dist.all_reduce(logged)
        logged = (logged / total.clamp(min=1)).tolist()
        out = {"loss": logged[0], "grad_norm": float(grad_norm), "lr": self.lr_at(self.step - 1),
               "targets": float(total)}
        out.update(zip(metrics, logged[1:], strict=True))
        return out

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _data_state(self) -> dict | None:
        state = getattr(self.data, "state_dict", None)
        return state() if callable(state) else None

    def save(self) -> Path | None:
        if self.rank != 0:
            return None
        name, config = self.save_fn(self.model)
        tensors = dict(self.model.state_dict())
        state = self.optimizer.state_dict()
        for i, st in state["state"].items():
            for k, v in st.items():
                tensors[f"optim.{i}.{k}"] = torch.as_tensor(v)
        extra = {"step": self.step, "data": self._data_state(), "param_groups": state["param_groups"],
                 "train_config": asdict(self.cfg)}
        own = getattr(self.model, "checkpoint_extra", None)  # the model's own metadata, if it has any
        if callable(own):
            extra.update(own())
        return save_checkpoint(self.out / CHECKPOINT, name, config, tensors, extra=extra)

    def save_weights(self) -> Path | None:
        """``DIR/model.safetensors``: the model's tensors and config without the optimizer (a third of the size)."""
        if self.rank != 0:
            return None
        name, config = self.save_fn(self.model)
        return save_checkpoint(self.out / WEIGHTS, name, config, dict(self.model.state_dict()),
                               extra={"step": self.step, "train_config": asdict(self.cfg)})

    def load(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path} (train without --resume first).")
        name, _ = self.save_fn(self.model)
        _, tensors, extra = load_checkpoint(path, expected_agent=name)
        load_state_dict_strict(self.model, {k: v for k, v in tensors.items() if not k.startswith("optim.")}, path)
        state: dict = {"state": {}, "param_groups": extra["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                state["state"].setdefault(int(i), {})[k] = value.to(self.device)
        self.optimizer.load_state_dict(state)
        self.step = int(extra["step"])
        data_state = extra.get("data")
        if data_state is not None and callable(getattr(self.data, "load_state_dict", None)):
            self.data.load_state_dict(data_state)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        if cfg.resume:
            self.load()
        callbacks = list(self.callbacks)
        if self.rank == 0:
            self.writer = self._writer()
            callbacks = [_TensorBoard()] + callbacks
            if cfg.progress:
                callbacks = [_ProgressBar()] + callbacks
        for cb in callbacks:
            cb.on_train_start(self)
        start, tokens = time.perf_counter(), 0.0
        while self.step < cfg.max_steps:
            out = self.train_step(self.next_batch())
            tokens += out["targets"]
            out["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
            self.history.append({"step": self.step, **out})
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            stop = [cb.on_step_end(self, out) for cb in callbacks]
            if any(stop):
                break
        self.save()
        self.save_weights()
        for cb in callbacks:
            cb.on_train_end(self)
        if self.writer is not None:
            self.writer.close()
        return self.history

    def _writer(self):
        summary_writer = require_tensorboard()
        self.out.mkdir(parents=True, exist_ok=True)
        return summary_writer(str(self.out / "tb"))


def require_tensorboard():
    """torch's ``SummaryWriter``, or a ``TrafficGymError`` with the install line when TensorBoard is missing
    (every trainer logs to it; setup.py cannot require it, see the README)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrafficGymError('TensorBoard is not installed: pip install "protobuf>=6.31.1,<8" '
                              '"tensorboard>=2.20,<3" (the README explains why setup.py cannot).') from e
    return SummaryWriter
