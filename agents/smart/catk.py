"""CAT-K ("closest among top-K", Zhang et al., arXiv 2412.05334): the token choice of the closed-loop fine-tuning
rollout and its training targets, for one 0.5 s step of many agents at once.

During a CAT-K rollout the policy scores the vocabulary at every 0.5 s step for every agent it drives. Among its
``k`` most likely tokens it takes the one whose box, placed at the agent's *rollout* pose, lands closest to the
*logged* box at the next step (mean corner distance); where the log is not valid then, the most likely one.
So the rollout visits states the policy itself produces, yet stays near the log. The training target at each
step is the token that leads from the rollout pose back to the logged pose at the next step (the same choice
behaviour cloning makes from the matched pose), masked where the log is not valid.
"""

from __future__ import annotations

import torch

from agents.smart.tokenizer import _relative, contour, contour_distance, nearest_final, place


def _local_log(rollout_pose: torch.Tensor, log_next: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` the logged next poses in the frame of the rollout poses."""
    return _relative(log_next[:, None, :].double(), rollout_pose.double())[:, 0]


def closest_among_top_k(logits: torch.Tensor, vocab_poses: torch.Tensor, rollout_pose: torch.Tensor,
                        log_next: torch.Tensor, log_next_valid: torch.Tensor, box: tuple[float, float],
                        k: int) -> torch.Tensor:
    """The CAT-K token of ``N`` agents of one type: logits ``(N, V)``; vocab_poses ``(V, TOKEN_STEPS + 1, 3)``;
    rollout_pose ``(N, 3)`` where each agent is now; log_next ``(N, 3)`` its logged pose 0.5 s later and
    log_next_valid ``(N,)`` bool; box: the vocabulary's (length, width); k: candidates (1 <= k <= V).

    Returns ``(N,)`` long: among the ``k`` most likely tokens, the one whose final box placed at the rollout pose
    is nearest (mean corner distance) to the logged box — ties: the more likely — or the most likely where the
    log is not valid. Ties in the logits go to the lower token index (``torch.topk`` order)."""
    v = logits.shape[-1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= v:
        raise ValueError(f"CAT-K top-k must be an integer in [1, {v}] (the vocabulary size), got {k!r}.")
    top = logits.topk(k, dim=-1).indices  # (N, k), most likely first
    chosen = top[:, 0].clone()
    ok = log_next_valid.bool()
    if ok.any():
        finals = vocab_poses[:, -1].double()[top[ok]]  # (n, k, 3) local final poses of the candidates
        placed = place(finals, rollout_pose[ok].double())  # (n, k, 3) in the world
        target = contour(log_next[ok].double(), box)[:, None]  # (n, 1, 4, 2)
        dist = contour_distance(contour(placed, box), target)  # (n, k)
        best = dist.argmin(dim=-1)  # first minimum: the more likely of tied candidates
        chosen[ok] = top[ok].gather(1, best[:, None])[:, 0]
    return chosen


def corrective_targets(vocab_poses: torch.Tensor, rollout_pose: torch.Tensor, log_next: torch.Tensor,
                       log_next_valid: torch.Tensor, box: tuple[float, float]) -> torch.Tensor:
    """The training targets of ``N`` agents at one step: the token whose final box, from the rollout pose
    ``(N, 3)``, is nearest to the logged pose 0.5 s later ``(N, 3)``; -1 where ``log_next_valid`` ``(N,)`` is
    False (no target)."""
    out = torch.full((len(rollout_pose),), -1, dtype=torch.long)
    ok = log_next_valid.bool().cpu()
    if ok.any():
        idx, _ = nearest_final(vocab_poses, _local_log(rollout_pose[ok], log_next[ok]), box)
        out[ok] = idx.cpu()
    return out.to(rollout_pose.device)
