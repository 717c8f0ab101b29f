"""Training the latent diffusion policy, in two stages on the shared trainer (checkpoints, TensorBoard, progress,
``torchrun``, validation):

1. ``train_vae``: the action VAE on every vehicle's logged action sequences (``training.diffusion_data``), the
   KL weight ramped from 0 to ``beta`` over the first ``beta_ramp`` of the steps; validated by the
   reconstruction error on the val split's sequences.
2. ``train_diffusion``: the context encoder and latent denoiser on the frozen VAE's latents of the logged
   futures, scenes at the replanning steps of a rollout (every 0.5 s from the first controlled step); validated by
   closed-loop rollouts (``training.bc.closed_loop_validation``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agents.latent_diffusion.agent import VAE_AGENT
from agents.latent_diffusion.denoiser import SIZES, DiffusionConfig
from agents.latent_diffusion.model import LatentDiffusionModel, vae_fingerprint
from agents.latent_diffusion.vae import ActionVAE, VaeConfig
from envs.errors import CheckpointError, TrafficGymError, UnknownNameError
from training.diffusion_data import ActionBatch, dataset_actions, diffusion_batch
from training.trainer import CHECKPOINT, Callback, SampleBatches, TrainConfig, Trainer, Validation

FIRST_STEP = 10  # the first controlled step of a rollout (1 s of history)
REPLAN = 5  # steps between the starts of the training sequences (the closed loop's replanning)


def save_vae(model: ActionVAE) -> tuple[str, dict]:
    return VAE_AGENT, model.cfg.to_json()


def save_diffusion(model: LatentDiffusionModel) -> tuple[str, dict]:
    return "latent_diffusion", model.config_json()


class _BetaRamp(Callback):
    """Sets the VAE's KL weight before every step: ``beta * min(1, step / ramp_steps)``."""

    def __init__(self, model: ActionVAE, beta: float, ramp_steps: int):
        self.model, self.beta, self.ramp = model, beta, max(ramp_steps, 1)

    def _set(self, step: int) -> None:
        self.model.beta.fill_(self.beta * min(1.0, step / self.ramp))

    def on_train_start(self, trainer) -> None:
        self._set(trainer.step)

    def on_step_end(self, trainer, out) -> None:
        self._set(trainer.step)


def action_scale(data: ActionBatch) -> tuple[float, float]:
    """The standard deviation of the known (acceleration, yaw rate) of ``data``: the VAE's input scale."""
    a = data.actions[data.mask]
    return tuple(float(v) for v in a.std(dim=0).clamp(min=1e-3))


def reconstruction(vae: ActionVAE, data: ActionBatch, chunk: int = 4096) -> dict:
    """The VAE's reconstruction of ``data`` through its posterior mean: the mean over sequences of the average
    position error over the known steps (``ade``, m) and of the squared error (``pos_mse``, m²)."""
    was = vae.training
    vae.eval()
    ade, mse = [], []
    with torch.no_grad():
        for i in range(0, len(data), chunk):
            part = data[slice(i, i + chunk)]
            mean, _ = vae.encode(part.actions, part.mask)
            _, pos = vae.decode(mean, part.v0)
            m = part.mask.float()
            steps = m.sum(-1).clamp(min=1)
            err = (pos - part.positions).norm(dim=-1)
            ade.append((err * m).sum(-1) / steps)
            mse.append((err.square() * m).sum(-1) / steps)
    vae.train(was)
    return {"ade": float(torch.cat(ade).mean()), "pos_mse": float(torch.cat(mse).mean())}


def train_vae(ds, out: str | Path, max_steps: int, batch_size: int = 256, lr: float = 1e-3, beta: float = 0.01,
              beta_ramp: float = 0.5, horizon: int = 52, latent_dim: int = 8, scenes: int | None = None,
              val_ds=None, val_scenes: int = 32, val_every: int = 500, seed: int = 0, resume: bool = False,
              progress: bool = True, ckpt_every: int = 500, callbacks=()) -> tuple[ActionVAE, list[dict]]:
    """Train an ``ActionVAE`` on the first ``scenes`` scenes of ``ds`` (see the module docstring); ``val_ds``:
    the split whose first ``val_scenes`` scenes' reconstruction is logged as ``val/ade`` every ``val_every``
    steps and at the end. Returns the model and the per-step history."""
    if not beta >= 0 or not 0 <= beta_ramp <= 1:
        raise ValueError(f"beta must be >= 0 and beta_ramp in [0, 1], got {beta!r}, {beta_ramp!r}.")
    out = Path(out)
    _refuse_resume_of_other(out, resume, VAE_AGENT)
    data = dataset_actions(ds, horizon, scenes, start_every=REPLAN, first_start=FIRST_STEP, progress=progress)
    if len(data) == 0:
        raise TrafficGymError("No vehicle action sequences in the training scenes (no vehicles with 10 known "
                              "future steps after the first second).")
    dt = float(ds[0].dt)
    torch.manual_seed(seed)
    vae = ActionVAE(VaeConfig(horizon=horizon, latent_dim=latent_dim, dt=dt, action_scale=action_scale(data)))
    val = None if val_ds is None else dataset_actions(val_ds, horizon, val_scenes, start_every=REPLAN,
                                                      first_start=FIRST_STEP)
    batches = SampleBatches(list(range(len(data))), lambda idx: data[torch.as_tensor(idx)], batch_size, seed=seed)
    cfg = TrainConfig(out=str(out), max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, resume=resume,
                      progress=progress, ckpt_every=ckpt_every, grad_clip=1.0)
    extra = [_BetaRamp(vae, beta, int(beta_ramp * max_steps))]
    if val is not None and len(val):
        extra.append(Validation(lambda m: reconstruction(m, val), val_every))
    trainer = Trainer(vae, batches, cfg, save_fn=save_vae, callbacks=extra + list(callbacks))
    return vae, trainer.fit()


def latent_scale(vae: ActionVAE, data: ActionBatch, chunk: int = 4096) -> float:
    """The standard deviation of the VAE encoder's means over ``data``: the scale that gives the diffusion model
    latents of unit variance."""
    with torch.no_grad():
        means = [vae.encode(data.actions[i:i + chunk], data.mask[i:i + chunk])[0] for i in range(0, len(data), chunk)]
    return float(torch.cat(means).std().clamp(min=1e-3))


def diffusion_items(ds, scenes: int, horizon: int) -> list[tuple[int, int]]:
    """``(scene index, start step)`` of every replanning step (every 0.5 s from the first controlled step) whose
    full ``horizon`` the log still covers, for the first ``scenes`` scenes."""
    items = []
    for i in range(scenes):
        items += [(i, t0) for t0 in range(FIRST_STEP, ds.entry(i).num_steps - horizon, REPLAN)]
    return items


def train_diffusion(ds, vae: ActionVAE, out: str | Path, max_steps: int, batch_size: int = 16, lr: float = 5e-4,
                    size: str = "nano", scenes: int | None = None, seed: int = 0, resume: bool = False,
                    progress: bool = True, ckpt_every: int = 200, validate_fn=None, val_every: int = 0,
                    callbacks=(), **overrides) -> tuple[LatentDiffusionModel, list[dict]]:
    """Train a ``LatentDiffusionModel`` of ``size`` (``SIZES``; ``overrides``: ``DiffusionConfig`` fields) on
    ``vae``'s latents of the logged futures of ``ds``'s first ``scenes`` scenes (see the module docstring). A run
    folder trained on another VAE is not resumed (``CheckpointError``: its latents mean something else)."""
    if size not in SIZES:
        raise UnknownNameError("latent diffusion size", size, SIZES)
    from dataclasses import fields

    known = [f.name for f in fields(DiffusionConfig) if f.name not in ("latent_steps", "latent_dim", "latent_scale",
                                                                        "vae_fingerprint")]
    for key in overrides:
        if key not in known:
            raise UnknownNameError("latent diffusion model option", key, known)
    out = Path(out)
    _refuse_resume_of_other(out, resume, "latent_diffusion")
    if resume:
        from agents.checkpoint import load_checkpoint

        cfg_json, _, _ = load_checkpoint(out / CHECKPOINT, expected_agent="latent_diffusion")
        theirs, ours = cfg_json["diffusion"]["vae_fingerprint"], vae_fingerprint(vae)
        if theirs != ours:
            raise CheckpointError(f"--resume: {out} was trained on another VAE ({theirs} vs {ours}); its latents "
                                  "would be meaningless through this one. Resume with the run's own VAE.")
    n = len(ds) if scenes is None else min(scenes, len(ds))
    horizon = vae.cfg.horizon
    sample = dataset_actions(ds, horizon, min(n, 64), start_every=REPLAN, first_start=FIRST_STEP)
    cfg = DiffusionConfig(**{**SIZES[size], "latent_steps": vae.cfg.latent_steps, "latent_dim": vae.cfg.latent_dim,
                             "latent_scale": latent_scale(vae, sample), **overrides})
    torch.manual_seed(seed)
    model = LatentDiffusionModel(cfg, vae)
    items = diffusion_items(ds, n, horizon)
    if not items:
        raise TrafficGymError(f"No scene of the {n} has {horizon} steps after its first {FIRST_STEP}: nothing to "
                              "train the diffusion model on.")
    from training.bc import batches_fill_by_map

    map_of = [ds.entry(i).map_id for i, _ in items]
    group = (lambda k: map_of[k]) if batches_fill_by_map(map_of, batch_size) else None
    batches = SampleBatches(list(range(len(items))),
                            lambda ks: diffusion_batch([(ds[items[k][0]], items[k][1]) for k in ks], model.cfg,
                                                       horizon),
                            batch_size, seed=seed, group_fn=group)
    tcfg = TrainConfig(out=str(out), max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, resume=resume,
                       progress=progress, ckpt_every=ckpt_every, grad_clip=1.0)
    extra = [Validation(validate_fn, val_every)] if validate_fn else []
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        (out / "diffusion.json").write_text(json.dumps({"scenes": n, "size": size, "seed": seed,
                                                        "vae": model.cfg.vae_fingerprint}, indent=1))
    trainer = Trainer(model, batches, tcfg, save_fn=save_diffusion, callbacks=extra + list(callbacks))
    return model, trainer.fit()


def _refuse_resume_of_other(out: Path, resume: bool, expected: str) -> None:
    """``--resume`` of a folder whose checkpoint is of another kind (a VAE run resumed as diffusion, ...)."""
    if not resume:
        return
    path = out / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"--resume: no {path} to continue from.")
    from agents.checkpoint import checkpoint_agent
    agent = checkpoint_agent(path)
    if agent != expected:
        what = {VAE_AGENT: "an action VAE run (trafficgym train vae)",
                "latent_diffusion": "a latent diffusion run (trafficgym train diffusion)"}
        raise CheckpointError(f"--resume: {out} is not {what[expected]} (its checkpoint is {agent!r}).")

