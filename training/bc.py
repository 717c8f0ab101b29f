"""``trafficgym train bc``: behaviour cloning of the tokenized policy (teacher-forced next-token cross-entropy
with label smoothing, ``SmartModel.loss``) on the model-agnostic trainer."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from agents.smart import SmartConfig, SmartModel
from agents.smart.tokenizer import MotionVocabulary
from envs.errors import TrafficGymError
from training.bc_data import collate, scene_sample
from training.trainer import SampleBatches, TrainConfig, Trainer, Validation

_WORKER: dict = {}


def _init_worker(ds, vocab, cfg, token_noise, seed, pose_targets) -> None:
    _WORKER.update(ds=ds, vocab=vocab, cfg=cfg, token_noise=token_noise, seed=seed, pose_targets=pose_targets)
    torch.set_num_threads(1)


def _sample_at(i: int):
    w = _WORKER
    return scene_sample(w["ds"][i], w["vocab"], w["cfg"], w["token_noise"], w["seed"], w["pose_targets"])


def build_samples(ds, vocab: MotionVocabulary, cfg: SmartConfig, limit: int | None = None, progress: bool = True,
                  workers: int = 0, token_noise: int = 1, seed: int = 0, pose_targets: str | None = None):
    """Training samples of the first ``limit`` scenes (all by default), read from the scene cache and tokenized
    in ``workers`` processes (0: in this process); ``token_noise``, ``pose_targets``: see
    ``bc_data.scene_sample``."""
    n = len(ds) if limit is None else min(limit, len(ds))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="tokenize scenes", unit="scene", dynamic_ncols=True)
    out = []
    if workers > 0 and n > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, _init_worker,
                                         (ds, vocab, cfg, token_noise, seed, pose_targets)) as pool:
            for sample in pool.imap(_sample_at, range(n), chunksize=8):
                out.append(sample)
                if bar is not None:
                    bar.update(1)
    else:
        for i in range(n):
            out.append(scene_sample(ds[i], vocab, cfg, token_noise, seed, pose_targets))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def train_bc(ds, vocab: MotionVocabulary | None, size: str, out: str | Path, max_steps: int, batch_size: int = 4,
             lr: float = 5e-4, resume: bool = False, seed: int = 0, scenes: int | None = None, progress: bool = True,
             ckpt_every: int = 200, validate_fn=None, val_every: int = 0, workers: int = 0, token_noise: int = 1,
             agent: str = "smart", init: str | None = None, pose_targets: str = "vehicles",
             **model_overrides) -> tuple[SmartModel, list]:
    """Train a model of ``size`` on ``ds`` (first ``scenes`` scenes if given); returns the model and the per-step
    history. ``agent``: ``"smart"`` (the tokenized policy: next-token cross-entropy) or ``"gmm_ego"`` (the
    Gaussian-mixture ego policy: NLL of the next pose of the ``pose_targets`` agents, ``"vehicles"`` or ``"ego"``;
    ``init`` a smart checkpoint, file or bundled name, whose map encoder and agent decoder it starts from, with
    that checkpoint's size and vocabulary). ``token_noise``: tokenize the training tracks with that many nearest
    tokens to draw from (``bc_data.scene_sample``; 1: none). Works in one process or under ``torchrun``
    (initialise ``torch.distributed`` first)."""
    if len(ds) == 0:
        raise TrafficGymError("The training split has no scenes.")
    if agent not in BC_AGENTS:
        from envs.errors import UnknownNameError

        raise UnknownNameError("agent trainable by behaviour cloning", agent, BC_AGENTS)
    torch.manual_seed(seed)
    backbone = None
    if init is not None:
        if agent != "gmm_ego":
            raise TrafficGymError(f"--init starts a gmm_ego model from smart weights; {agent} trains from scratch.")
        backbone = _smart_backbone(init)
        vocab = backbone.motion_vocabulary()
        cfg = SmartConfig(**{**backbone.cfg.to_json(), **model_overrides})
    else:
        cfg = SmartConfig.of_size(size, {k: len(v) for k, v in vocab.poses.items()}, **model_overrides)
    if agent == "gmm_ego":
        from agents.gmm_ego import GmmEgoModel

        model = GmmEgoModel(cfg, vocab)
        if backbone is not None:
            missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
            assert all(k.startswith(("gmm_head.", "anchors")) for k in missing), missing
            assert all(k.startswith("heads.") for k in unexpected), unexpected
        targets = pose_targets
    else:
        model, targets = SmartModel(cfg, vocab), None
    samples = [x for x in build_samples(ds, vocab, cfg, scenes, progress, workers, token_noise, seed, targets)
               if (x.num_pose_targets if targets else x.num_targets) > 0]
    if not samples:
        raise TrafficGymError(f"No training samples: none of the {len(ds)} scenes has a {agent} target"
                              + (f" ({pose_targets})." if targets else "."))
    if targets and not resume:  # the mixture's anchors: k-means of the training targets (resume: from the file)
        import numpy as np

        poses = np.concatenate([x.next_pose[x.next_pose_valid] for x in samples])
        model.set_anchors(torch.from_numpy(poses), seed=seed)
    data = SampleBatches(samples, collate, batch_size, seed=seed,
                         group_fn=_map_of if batches_fill_by_map([x.map_id for x in samples], batch_size) else None)
    trainer = Trainer(model, data, TrainConfig(out=str(out), max_steps=max_steps, batch_size=batch_size, lr=lr,
                                               seed=seed, resume=resume, progress=progress, ckpt_every=ckpt_every),
                      save_fn=save_smart, callbacks=[Validation(validate_fn, val_every)] if validate_fn else [])
    start = time.perf_counter()
    history = trainer.fit()
    if history:
        history[-1]["wall_s"] = time.perf_counter() - start
    return model, history


BC_AGENTS = ("smart", "gmm_ego")


def _smart_backbone(init: str) -> SmartModel:
    from agents.smart import SmartAgent

    return SmartAgent.from_checkpoint(init).model


def save_smart(model: SmartModel) -> tuple[str, dict]:
    """The checkpoint metadata of a tokenized-policy model (or of a model on its backbone, ``gmm_ego``): its agent
    name and config."""
    from agents.gmm_ego import GmmEgoModel

    if isinstance(model, GmmEgoModel):
        return "gmm_ego", model.config_json()
    return "smart", {**model.cfg.to_json(), "tol": model.tol}


def _map_of(sample) -> str:
    return sample.map_id


def batches_fill_by_map(map_ids: list[str], batch_size: int) -> bool:
    """Whether batches of one map each still use >= 90 % of the samples (their ``map_ids``) per epoch (not so on
    datasets with a map per scene, e.g. Waymo's: there every batch mixes maps)."""
    from collections import Counter

    sizes = Counter(map_ids).values()
    return sum(n // batch_size * batch_size for n in sizes) >= 0.9 * len(map_ids)


def closed_loop_validation(val_ds, scenes: int = 4, rollouts: int = 4, seed: int = 0, agent: str = "smart"):
    """A ``validate_fn`` for the trainer: closed-loop rollouts of the model on ``scenes`` val scenes spread evenly
    over the split (``rollouts`` samples each; a split is often ordered by map, and the first few scenes would all
    be one town). ``agent="smart"``: the model drives every agent; the mean realism meta-metric, minADE and BLM's
    collision and off-road rates. ``agent="gmm_ego"``: the model drives the ego among the logged others; the ego's
    minADE and ADE and the fractions of rollouts where it collides / leaves the road. ``agent="latent_diffusion"``:
    as ``smart``, with the diffusion policy driving every agent."""
    import copy

    import numpy as np

    from envs.metrics.episode import compute_episode_metrics
    from training.rollouts import simulate_scene

    picked = np.unique(np.linspace(0, len(val_ds) - 1, min(scenes, len(val_ds))).round().astype(int)).tolist()
    if agent == "gmm_ego":
        from agents.gmm_ego import GmmEgoAgent

        def make(model):
            return GmmEgoAgent(model)

        setting, metrics = "ego", ["planning"]
        keys = ("planning_min_ade", "planning_ade", "planning_collision", "planning_offroad")
        picked = [i for i in picked if val_ds.entry(i).ego_index >= 0]
    elif agent == "latent_diffusion":
        from agents.latent_diffusion import LatentDiffusionAgent

        def make(model):
            return LatentDiffusionAgent(model)

        setting, metrics = "sim_agents", ["realism", "min_ade", "blm_safety"]
        keys = ("realism_meta_wosac2024", "min_ade", "blm_collision_rate", "blm_offroad_rate")
    else:
        from agents.smart import SmartAgent

        def make(model):
            return SmartAgent(model, top_k=48)

        setting, metrics = "sim_agents", ["realism", "min_ade", "blm_safety"]
        keys = ("realism_meta_wosac2024", "min_ade", "blm_collision_rate", "blm_offroad_rate")

    def validate(model: SmartModel) -> dict:
        policy = make(copy.deepcopy(model).eval())
        rows = []
        for i in picked:
            r = simulate_scene(policy, val_ds, i, rollouts, setting=setting, seed=seed + i)
            m = compute_episode_metrics(r, metrics)
            rows.append([m[k] for k in keys])
        return dict(zip(keys, np.nanmean(np.asarray(rows, dtype=float), axis=0).tolist(), strict=True))

    return validate
