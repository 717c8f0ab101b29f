"""CAT-K fine-tuning data: a scene rolled out by the policy itself (``agents.smart.agent.CatKRollout``, closest
among its top-k tokens to the log), turned into a teacher-forcing sample.

The token choice needs no gradient, so the rollout runs without one and the model is then teacher-forced on the
tokens it visited (one batched pass instead of a differentiable rollout): the inputs at every 0.5 s boundary are
the rollout's poses and the tokens that led into them, and the target of every agent the policy drove there is
the token from its rollout pose back to its logged pose 0.5 s later (``agents.smart.catk.corrective_targets``).
The teacher-forced logits equal the rollout's incremental ones at every step (tested).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from agents.gmm_ego import TRACKING, GmmCatKRollout, GmmEgoModel, reachable_target
from agents.nn.attention import RadiusGrid, relative_pose
from agents.nn.map_pieces import cached_map_pieces, map_piece_grid_table
from agents.smart.agent import TOKEN_BOX_OF, CatKRollout
from agents.smart.catk import corrective_targets
from agents.smart.model import MAP_GRID_CELL, SmartModel, TokenBatch, type_of
from agents.smart.tokenizer import TOKEN_STEPS, nearest_final
from envs import sim
from envs.errors import CheckpointError, TrafficGymError, UnknownNameError
from envs.fileio import atomic_write
from training.bc import batches_fill_by_map, save_smart
from training.bc_data import POSE_TARGETS, TokenSample, collate, scene_sample, token_sample
from training.rollouts import drive
from training.trainer import SampleBatches, TrainConfig, Trainer, Validation, rank_and_world


def catk_sample(agent: CatKRollout, scene, map_index=None, start_step: int = 10, seed: int = 0
                ) -> TokenSample:
    """``catk_samples`` of one scene."""
    return catk_samples(agent, [scene], None if map_index is None else [map_index], start_step, seed)[0]


@torch.no_grad()
def catk_samples(agent: CatKRollout | GmmCatKRollout, scenes, map_indices=None, start_step: int = 10,
                 seed: int = 0, pose_targets: str = "ego") -> list[TokenSample]:
    """One CAT-K rollout of ``scenes``, batched (every agent valid at ``start_step`` driven by ``agent``, the
    others replay their log; map exits remove agents as in evaluation), as one ``TokenSample`` per scene over the
    boundaries ``0, 5, 10, ...`` of the whole scene: poses and validity of the rollout, input tokens (the chosen
    ones where the policy drove the agent through the last 0.5 s, else the token nearest to the actual motion, -1
    at the first boundary or after a gap), targets where the policy chose a token (-1 elsewhere and where the log
    0.5 s later is invalid). ``map_indices``: each scene's ``MapIndex`` (e.g. ``SceneDataset.map_index``).

    With a ``GmmCatKRollout`` (the ego policy) only the ego is driven, and the samples' targets are its poses:
    ``next_pose`` is the logged pose 0.5 s after each boundary it drove from, in the frame of its rollout pose
    there, made reachable (``_ego_sample``; ``pose_targets="vehicles"`` adds the other vehicles' logged poses)."""
    distinct = {}  # map id -> (map, its index or None), in order of first use
    for i, scene in enumerate(scenes):
        distinct.setdefault(scene.map_id, (scene.map, None if map_indices is None else map_indices[i]))
    maps, indices = zip(*distinct.values(), strict=True)
    batch = sim.stack_maps(list(maps), indices=None if map_indices is None else list(indices))
    ego = isinstance(agent, GmmCatKRollout)
    state = sim.reset(list(scenes), start_step=start_step, controlled="ego" if ego else "all", maps=batch)
    state = drive(state, agent, None, seed)
    if ego:
        return [_ego_sample(agent, scene, state, b, start_step, pose_targets) for b, scene in enumerate(scenes)]
    return [_scene_sample(agent, scene, state, b) for b, scene in enumerate(scenes)]


def _rollout_inputs(model, scene, state, b: int, drove: torch.Tensor | None, chosen: torch.Tensor | None,
                    final: bool = False):
    """The teacher-forcing inputs of row ``b`` of a finished rollout: poses ``(A, S, 3)`` and validity at the
    boundaries, and input tokens: ``chosen`` where the policy drove the agent into the boundary (``drove``
    ``(A, S)``: it chose a token at the boundary before), else the token nearest to the actual motion (as the
    rollout tokenized it), -1 at the first boundary or after a gap. The boundaries are those with a step 0.5 s
    later in the scene (they have a target), or with ``final`` every boundary up to the last step (PPO values
    the final state)."""
    a = scene.num_agents
    n_b = (scene.num_steps - 1) // TOKEN_STEPS + (1 if final else 0)
    steps = torch.arange(n_b) * TOKEN_STEPS
    pose = state.traj[b, :a][:, steps, :3].float()  # (A, S, 3)
    ok = state.valid[b, :a][:, steps]
    kinds = torch.as_tensor(scene.agent_type).long()
    in_token = torch.full((a, n_b), -1, dtype=torch.long) if chosen is None else chosen
    drove = torch.zeros((a, n_b), dtype=torch.bool) if drove is None else drove
    prev_ok = torch.zeros_like(ok)
    prev_ok[:, 1:] = ok[:, 1:] & ok[:, :-1]
    for name in model.types:
        fill = prev_ok & (kinds == type_of(name))[:, None] & ~(torch.roll(drove, 1, dims=1) & (torch.arange(n_b) > 0))
        if fill.any():
            prev = torch.roll(pose, 1, dims=1)
            idx, _ = nearest_final(model.vocab(name), relative_pose(prev[fill], pose[fill]), TOKEN_BOX_OF[name])
            in_token[fill] = idx
    return pose, ok, in_token


def _scene_sample(agent: CatKRollout, scene, state, b: int) -> TokenSample:
    """Row ``b`` of a finished CAT-K rollout ``state`` as the ``TokenSample`` of its ``scene``."""
    model = agent.model
    a = scene.num_agents
    n_b = (scene.num_steps - 1) // TOKEN_STEPS
    kinds = torch.as_tensor(scene.agent_type).long()
    chosen = torch.full((a, n_b), -1, dtype=torch.long)
    target = torch.full((a, n_b), -1, dtype=torch.long)
    drove = torch.zeros((a, n_b), dtype=torch.bool)
    log = torch.as_tensor(scene.trajectory)[..., :3].float()
    log_valid = torch.as_tensor(scene.valid)
    for t, sel, tok, _ in agent.chosen_in_row(b):
        s = t // TOKEN_STEPS
        rows = sel[:a].cpu()
        if t % TOKEN_STEPS or s >= n_b or not rows.any():
            continue
        drove[rows, s] = True
        if s + 1 < n_b:
            chosen[rows, s + 1] = tok.cpu()
    pose, ok, in_token = _rollout_inputs(model, scene, state, b, drove, chosen)
    for name in model.types:
        # targets: back to the log 0.5 s later, from where the rollout is
        sel = drove & (kinds == type_of(name))[:, None]
        if sel.any():
            agent_i, s_i = sel.nonzero(as_tuple=True)
            t_next = (s_i + 1) * TOKEN_STEPS
            inside = t_next < scene.num_steps
            next_ok = inside & log_valid[agent_i, t_next.clamp(max=scene.num_steps - 1)]
            log_next = log[agent_i, t_next.clamp(max=scene.num_steps - 1)]
            target[agent_i, s_i] = corrective_targets(model.vocab(name), pose[agent_i, s_i], log_next, next_ok,
                                                      TOKEN_BOX_OF[name])
    return token_sample(scene, pose.numpy(), ok.numpy(), in_token.numpy(), target.numpy(), model.cfg,
                        m2a=_rollout_m2a(scene.map, pose, model.cfg))


def _ego_sample(agent: GmmCatKRollout, scene, state, b: int, start_step: int, pose_targets: str = "ego"
                ) -> TokenSample:
    """Row ``b`` of a finished ego rollout as a ``TokenSample`` with the ego's pose targets: at every boundary
    from ``start_step`` on where the ego is in the rollout and its log 0.5 s later is valid, the pose toward that
    logged pose which the bicycle reaches in 0.5 s from the rollout state (``reachable_target``), in the frame of
    the rollout pose. ``pose_targets="vehicles"`` adds every other vehicle's logged pose 0.5 s after each boundary
    it is in the scene (they replay the log: behaviour-cloning targets, as ``bc_data.scene_sample`` makes them)."""
    from envs.geometry import pose_in_frame
    from envs.types import AgentType

    model = agent.model
    pose, ok, in_token = _rollout_inputs(model, scene, state, b, None, None)
    a, n_b = ok.shape
    e = int(state.ego[b])
    log = torch.as_tensor(scene.trajectory)[..., :3].float()
    log_valid = torch.as_tensor(scene.valid)
    s = torch.arange(n_b)
    t_next = ((s + 1) * TOKEN_STEPS).clamp(max=scene.num_steps - 1)
    inside = (s + 1) * TOKEN_STEPS < scene.num_steps
    next_valid = torch.zeros(a, n_b, dtype=torch.bool)
    next_pose = pose_in_frame(log[:, t_next], pose)
    if pose_targets == "vehicles":
        others = torch.as_tensor(scene.agent_type) == int(AgentType.VEHICLE)
        others[e] = False
        next_valid[others] = (ok & inside & log_valid[:, t_next])[others]
    next_valid[e] = ok[e] & (s * TOKEN_STEPS >= start_step) & inside & log_valid[e, t_next]
    next_pose[e] = reachable_target(state.traj[b, e, s * TOKEN_STEPS].float(), next_pose[e], float(state.dt))
    sample = token_sample(scene, pose.numpy(), ok.numpy(), in_token.numpy(), np.full((a, n_b), -1, np.int64),
                          model.cfg, m2a=_rollout_m2a(scene.map, pose, model.cfg))
    sample.next_pose, sample.next_pose_valid = next_pose.numpy(), next_valid.numpy()
    return sample


def _rollout_m2a(m, pose: torch.Tensor, cfg) -> np.ndarray | None:
    """``(A, S, k_m2a)`` the map pieces each agent-step attends to, found as the rollout finds them (the same
    grid, so equally distant pieces are ordered the same way: the teacher-forced pass then sees exactly the
    rollout's neighbours); None on a map without pieces."""
    if m is None or not len(cached_map_pieces(m)["pose"]):
        return None
    p = cached_map_pieces(m)
    grid = RadiusGrid.stack([map_piece_grid_table(m, cfg.m2a_radius, MAP_GRID_CELL)], cfg.m2a_radius, MAP_GRID_CELL)
    keys = torch.as_tensor(p["pose"][:, :2]).float()[None]
    idx, ok = grid.knn(pose[None, ..., :2].reshape(1, -1, 2).float(), torch.zeros(1, dtype=torch.long), keys,
                       cfg.k_m2a)
    return torch.where(ok, idx, -1)[0].reshape(*pose.shape[:2], -1).numpy().astype(np.int64)



# What trains in each frozen-set option (parameter name prefixes of SmartModel); everything else is frozen.
# "catk" follows CAT-K: the prediction head and the agent decoder's temporal, map->agent and agent<->agent
# attention (with their relative-pose encodings) train; the map encoder and every embedding stay as they were.
# The ego policy (``agents.gmm_ego``) has the same backbone; its mixture head (``gmm_head.``) trains with it.
TRAINABLE = {
    "catk": ("temporal.", "m2a.", "a2a.", "t_rel.", "m2a_rel.", "a2a_rel.", "head_norm.", "heads.", "gmm_head."),
    "decoder": ("temporal.", "m2a.", "a2a.", "t_rel.", "m2a_rel.", "a2a_rel.", "head_norm.", "heads.", "gmm_head.",
                "token_mlp.", "bos", "agent_type.", "size_mlp."),
    "none": ("",),  # every parameter trains
}
ROLLOUTS = ("catk", "topk", "log")
RUN_FILE = "catk.json"  # a CAT-K run folder's options


def freeze(model: torch.nn.Module, frozen: str) -> list[str]:
    """Set ``requires_grad`` by the frozen-set option ``frozen`` (``TRAINABLE``); returns the trained names."""
    if frozen not in TRAINABLE:
        raise UnknownNameError("frozen set", frozen, TRAINABLE)
    keep = TRAINABLE[frozen]
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(keep))
        if p.requires_grad:
            trained.append(name)
    return trained


def train_catk(model: SmartModel, ds, out: str | Path, max_steps: int, batch_size: int = 4, lr: float = 5e-5,
               final_lr_fraction: float = 0.05, top_k: int = 32, rollout: str = "catk", frozen: str = "catk",
               scenes: int | None = None, seed: int = 0, resume: bool = False, progress: bool = True,
               ckpt_every: int = 200, validate_fn=None, val_every: int = 0, start_step: int = 10,
               init: str = "", callbacks=(), tracking: str = "pose", pose_targets: str = "ego",
               bc_mix: int = 0):
    """Fine-tune ``model`` (a BC-trained ``SmartModel``) on ``ds``'s first ``scenes`` scenes by CAT-K.

    Each step rolls the next batch of scenes out with the current model (``rollout``: ``"catk"`` closest among
    top-k to the log, ``"topk"`` top-k sampling, or ``"log"``: no rollout, the BC samples — behaviour cloning
    continued at this learning rate, the control), teacher-forces it on the visited tokens and takes one step on
    the cross-entropy without label smoothing. ``frozen`` picks what trains (``TRAINABLE``). ``OUT/catk.json``
    records the run's options (``init``: where the weights came from); resuming a folder without it (e.g. a BC
    run) is refused. ``callbacks``: more ``training.trainer.Callback`` objects. Returns the model and the per-step
    history.

    A ``GmmEgoModel`` (the ego policy) is fine-tuned the same way on its ego: the rollout drives the ego alone
    (``GmmCatKRollout``: closest of the top-k components to the log; the others replay the log), and the loss is
    the mixture NLL of the pose toward the logged pose 0.5 s ahead that the bicycle reaches from the rollout state
    (``agents.gmm_ego.reachable_target``), in the frame of the rollout pose; only scenes with an ego are used.
    ``tracking``: how the rollout's bicycle follows the chosen component (``"pose"``: lands on it; ``"speed"``:
    as the agent drives in evaluation; see ``agents.gmm_ego.bicycle_toward``). ``pose_targets="vehicles"`` also
    trains on every other vehicle's logged next pose (they replay the log), as the BC of ``towns-gmm`` did.

    ``bc_mix`` > 0: every batch also carries the behaviour-cloning samples of its scenes, tokenized with that many
    nearest tokens of noise (``bc_data.scene_sample``; new noise at every visit), so the fine-tuning keeps training
    on inputs off the log with targets back to it, as the BC weights were trained (0: CAT-K samples only)."""
    if rollout not in ROLLOUTS:
        raise UnknownNameError("CAT-K rollout", rollout, ROLLOUTS)
    if frozen not in TRAINABLE:
        raise UnknownNameError("frozen set", frozen, TRAINABLE)
    if tracking not in TRACKING:
        raise UnknownNameError("tracking", tracking, TRACKING)
    if pose_targets not in POSE_TARGETS:
        raise UnknownNameError("pose-target set", pose_targets, POSE_TARGETS)
    if not isinstance(bc_mix, int) or isinstance(bc_mix, bool) or bc_mix < 0:
        raise ValueError(f"bc_mix must be a non-negative integer (token-noise neighbours; 0: off), got {bc_mix!r}.")
    if bc_mix and rollout == "log":
        raise ValueError("bc_mix adds behaviour-cloning samples to CAT-K rollouts; with rollout='log' every sample "
                         "already is one.")
    ego = isinstance(model, GmmEgoModel)
    v, what = (model.components, "mixture components") if ego else \
        (min(len(model.vocab(n)) for n in model.types), "the vocabulary size")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= v:
        raise ValueError(f"top_k must be an integer in [1, {v}] ({what}), got {top_k!r}.")
    out = Path(out)
    if resume and not (out / RUN_FILE).exists():
        weights = out / "model.safetensors"
        raise CheckpointError(f"--resume: {out} is not a CAT-K run (no {RUN_FILE}); a BC run folder is not "
                              f"continued as CAT-K. Fine-tune into a new folder with --init {weights}.")
    n = len(ds) if scenes is None else min(scenes, len(ds))
    if n == 0:
        raise TrafficGymError("The training split has no scenes.")
    usable = [i for i in range(n) if ds.entry(i).ego_index >= 0] if ego else list(range(n))
    if not usable:
        raise TrafficGymError(f"None of the {n} scenes has an ego to fine-tune the ego policy on.")
    if not resume and rank_and_world()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(out / RUN_FILE) as tmp:
            tmp.write_text(json.dumps({"agent": "gmm_ego" if ego else "smart", "init": init, "rollout": rollout,
                                       "frozen": frozen, "top_k": top_k, "lr": lr, "scenes": n, "seed": seed,
                                       "bc_mix": bc_mix,
                                       **({"tracking": tracking, "pose_targets": pose_targets} if ego else {})},
                                      indent=1))
    torch.manual_seed(seed)
    model.cfg = replace(model.cfg, label_smoothing=0.0)
    freeze(model, frozen)
    vocab = model.motion_vocabulary()
    rollout_cls = GmmCatKRollout if ego else CatKRollout
    agent = None if rollout == "log" else rollout_cls(model, top_k=top_k, choice=rollout,
                                                      **({"tracking": tracking} if ego else {}))
    maps = {}
    visits = [0]

    def make_batch(indices: list[int]) -> TokenBatch:
        scenes = [ds[i] for i in indices]
        if agent is None:
            return collate([scene_sample(scene, vocab, model.cfg, seed=seed, pose_targets=pose_targets if ego else None)
                            for scene in scenes])
        for scene in scenes:
            if scene.map_id not in maps:
                maps[scene.map_id] = ds.map_index(scene.map_id)
        was_training = model.training
        model.eval()
        # one batched rollout of this process's scenes; its seed follows the batch's first scene
        samples = catk_samples(agent, scenes, [maps[scene.map_id] for scene in scenes], start_step=start_step,
                               seed=seed + 7919 * indices[0], pose_targets=pose_targets)
        model.train(was_training)
        if bc_mix:
            visits[0] += 1
            samples += [scene_sample(scene, vocab, model.cfg, token_noise=bc_mix, seed=seed + 104_729 * visits[0],
                                     pose_targets=pose_targets if ego else None) for scene in scenes]
        return collate(samples)

    data = SampleBatches(usable, make_batch, batch_size, seed=seed,
                         group_fn=(lambda i: ds.entry(i).map_id)
                         if batches_fill_by_map([ds.entry(i).map_id for i in usable], batch_size) else None)
    cfg = TrainConfig(out=str(out), max_steps=max_steps, batch_size=batch_size, lr=lr,
                      final_lr_fraction=final_lr_fraction, seed=seed, resume=resume, progress=progress,
                      ckpt_every=ckpt_every)
    trainer = Trainer(model, data, cfg, save_fn=save_smart,
                      callbacks=([Validation(validate_fn, val_every)] if validate_fn else []) + list(callbacks))
    return model, trainer.fit()

