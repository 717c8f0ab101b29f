"""The IDM step as one compiled loop (numba): locate each agent on its path, find the nearest obstacle ahead,
apply IDM's acceleration and advance along the path. ``agents/idm.py`` documents the model; this file holds
only the arithmetic, over plain numpy arrays.

Why compiled: the step is a few thousand tiny per-pair tests (each agent against the few agents whose swept
box reaches its look-ahead window). As torch ops that was ~200 kernel launches per step, dominated by dispatch
at this size; a loop over scenes and agents costs a fraction of the simulator step itself.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from envs.parallel import parallel_kernel

_NONE = 1e30  # "nothing found": finite, since idm_step is compiled with fastmath (which assumes no inf / nan)


@numba.njit(cache=True, nogil=True)
def full_search(path, length, rows, xy):
    """Arc index of the nearest path point, searching the whole path, for ``rows`` ``(K, 2)`` (batch, agent)
    at positions ``xy`` ``(K, 2)``."""
    out = np.zeros(len(rows), np.float32)
    for r in range(len(rows)):
        b, a = rows[r, 0], rows[r, 1]
        best, k = np.inf, 0
        for p in range(length[b, a]):
            dx, dy = path[b, a, p, 0] - xy[r, 0], path[b, a, p, 1] - xy[r, 1]
            d2 = dx * dx + dy * dy
            if d2 < best:
                best, k = d2, p
        out[r] = k
    return out


@numba.njit(cache=True, nogil=True)
def _window_locate(path, b, a, last, pos_idx, x, y):
    """Arc position (in path-point units) of ``(x, y)``: the nearest path point in a window around
    ``pos_idx``, refined onto its two adjacent segments."""
    best, k = np.inf, 0
    for o in range(-3, 13):
        idx = min(max(pos_idx + o, 0), last)
        dx, dy = path[b, a, idx, 0] - x, path[b, a, idx, 1] - y
        d2 = dx * dx + dy * dy
        if d2 < best:
            best, k = d2, idx
    best_d, best_s = np.inf, 0.0
    for lo in (max(k - 1, 0), k):
        hi = min(lo + 1, last)
        x0, y0 = path[b, a, lo, 0], path[b, a, lo, 1]
        sx, sy = path[b, a, hi, 0] - x0, path[b, a, hi, 1] - y0
        frac = ((x - x0) * sx + (y - y0) * sy) / max(sx * sx + sy * sy, 1e-9)
        frac = min(max(frac, 0.0), 1.0)
        d = math.hypot(x0 + frac * sx - x, y0 + frac * sy - y)
        s_here = lo + (frac if hi > lo else 0.0)
        if d < best_d:
            best_d, best_s = d, s_here
    return best_s


@parallel_kernel(fastmath=True)  # keeps torch's thread count (a bare parallel njit reset it to all cores)
def idm_step(path, length, pos, placed, was_live, cur, live, driven, width, half_len_of, v0, dt, spacing,
             params, pose, gone):
    """One IDM step for every scene, in place (scenes in parallel threads).

    path ``(B, A, P, 2)`` points every ``spacing`` m, length ``(B, A)`` points per path; pos ``(B, A)`` arc
    position (m), placed ``(B, A)`` whether ``pos`` is exact (this IDM moved the agent last step), was_live
    ``(B, A)``; cur ``(B, A, 5)`` x, y, heading, vx, vy; live, driven ``(B, A)``; width, half_len_of, v0
    ``(B, A)``. params: time_headway, min_gap, max_accel, comfort_decel, delta, max_brake, lookahead,
    lateral_margin, yield_horizon. Writes pose ``(B, A, 3)``, gone ``(B, A)``, and updates pos, placed, was_live.
    """
    t_head, s0, a_max, b_comf, delta, max_brake, lookahead, lat_margin, horizon = params
    n_b, n_a = live.shape
    n_win = int(lookahead / spacing)
    n_tau = int(math.floor((horizon - 0.5 + 1e-6) / 0.5)) + 1 if horizon >= 0.5 else 0
    sqrt_ab = 2.0 * math.sqrt(a_max * b_comf)
    for b in numba.prange(n_b):  # scenes are independent: each writes only its own rows
        win = np.empty((n_win, 2))
        # where each live agent is on its path (agents this IDM moved last step are exactly at pos)
        for a in range(n_a):
            if not live[b, a] or placed[b, a]:
                continue
            last = length[b, a] - 1
            x, y = cur[b, a, 0], cur[b, a, 1]
            if not was_live[b, a]:  # just appeared: search the whole path
                best, k = _NONE, 0
                for p in range(last + 1):
                    dx, dy = path[b, a, p, 0] - x, path[b, a, p, 1] - y
                    d2 = dx * dx + dy * dy
                    if d2 < best:
                        best, k = d2, p
                pos[b, a] = k * spacing
            else:
                pos[b, a] = _window_locate(path, b, a, last, int(math.floor(pos[b, a] / spacing)), x, y) * spacing
        for i in range(n_a):
            gone[b, i] = False
            pose[b, i, 0], pose[b, i, 1], pose[b, i, 2] = cur[b, i, 0], cur[b, i, 1], cur[b, i, 2]
            if not driven[b, i]:
                continue
            last = length[b, i] - 1
            v = math.hypot(cur[b, i, 3], cur[b, i, 4])
            # the look-ahead window: path points 1 .. n_win m past the agent, and its bounding box
            base = int(math.floor(pos[b, i] / spacing))
            lo_x = lo_y = _NONE
            hi_x = hi_y = -_NONE
            for w in range(n_win):
                idx = min(base + 1 + w, last)
                win[w, 0], win[w, 1] = path[b, i, idx, 0], path[b, i, idx, 1]
                lo_x, hi_x = min(lo_x, win[w, 0]), max(hi_x, win[w, 0])
                lo_y, hi_y = min(lo_y, win[w, 1]), max(hi_y, win[w, 1])
            gap, lead_speed = _NONE, 0.0
            for j in range(n_a):
                if j == i or not live[b, j]:
                    continue
                xj, yj, vxj, vyj = cur[b, j, 0], cur[b, j, 1], cur[b, j, 3], cur[b, j, 4]
                corridor = 0.5 * (width[b, i] + width[b, j]) + lat_margin
                reach = corridor + 0.5  # crossing tests sample every other path point: 0.5 m more corridor
                # broad phase: j's box swept over the yield horizon must reach the window's box
                xe, ye = xj + vxj * horizon, yj + vyj * horizon
                if (max(xj, xe) < lo_x - reach or min(xj, xe) > hi_x + reach
                        or max(yj, ye) < lo_y - reach or min(yj, ye) > hi_y + reach):
                    continue
                half_len = half_len_of[b, i] + half_len_of[b, j]
                # (1) on the path now: the nearest window point within the corridor
                best, k = _NONE, 0
                if lo_x - corridor <= xj <= hi_x + corridor and lo_y - corridor <= yj <= hi_y + corridor:
                    for w in range(n_win):
                        dx, dy = win[w, 0] - xj, win[w, 1] - yj
                        d2 = dx * dx + dy * dy
                        if d2 < best:
                            best, k = d2, w
                if best < corridor * corridor:
                    k0 = k if k < n_win - 1 else n_win - 2
                    tx, ty = win[k0 + 1, 0] - win[k0, 0], win[k0 + 1, 1] - win[k0, 1]
                    norm = max(math.hypot(tx, ty), 1e-6)
                    cand_gap = (k + 1) * spacing - half_len
                    cand_speed = max((vxj * tx + vyj * ty) / norm, 0.0)
                elif n_tau > 0 and math.hypot(vxj, vyj) > 0.5:
                    # (2) crossing: j (constant velocity) reaches the path before this agent gets there
                    conflict = _NONE
                    for h in range(n_tau):
                        tau = 0.5 * (h + 1)
                        px, py = xj + vxj * tau, yj + vyj * tau
                        if not (lo_x - reach <= px <= hi_x + reach and lo_y - reach <= py <= hi_y + reach):
                            continue
                        for w in range(1, n_win, 2):
                            dx, dy = win[w, 0] - px, win[w, 1] - py
                            if dx * dx + dy * dy < reach * reach:
                                meet = (w + 1) * spacing
                                if tau < meet / max(v, 0.5):
                                    conflict = min(conflict, meet)
                                break
                    cand_gap, cand_speed = conflict - half_len, 0.0
                else:
                    continue
                if cand_gap < gap:
                    gap, lead_speed = cand_gap, cand_speed
            # IDM (Treiber et al. 2000)
            s_star = s0 + max(v * t_head + v * (v - lead_speed) / sqrt_ab, 0.0)
            free = 1.0 - max(v / v0[b, i], 0.0) ** delta
            interaction = (s_star / max(gap, 0.1)) ** 2 if gap < _NONE else 0.0
            accel = min(max(a_max * (free - interaction), -max_brake), a_max)
            v_new = max(v + accel * dt, 0.0)
            end = last * spacing
            s_new = min(pos[b, i] + 0.5 * (v + v_new) * dt, end)
            # pose at s_new along the path (heading = path direction; one-point paths keep the heading)
            i0 = min(max(int(math.floor(s_new / spacing)), 0), max(last - 1, 0))
            i1 = min(i0 + 1, last)
            frac = min(max(s_new / spacing - i0, 0.0), 1.0)
            dx, dy = path[b, i, i1, 0] - path[b, i, i0, 0], path[b, i, i1, 1] - path[b, i, i0, 1]
            pose[b, i, 0] = path[b, i, i0, 0] + frac * dx
            pose[b, i, 1] = path[b, i, i0, 1] + frac * dy
            if i1 > i0:
                pose[b, i, 2] = math.atan2(dy, dx)
            # the end of a path is a dead end of the lane graph (the map border): the agent leaves there
            gone[b, i] = s_new >= end - 1e-6 and pos[b, i] < end - 1e-6
            pos[b, i] = s_new
        for a in range(n_a):
            placed[b, a] = driven[b, a]
            was_live[b, a] = live[b, a]
