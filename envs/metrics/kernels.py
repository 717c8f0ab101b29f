"""The per-step box features of the episode metrics as compiled loops (numba), over plain numpy arrays;
``features.py`` documents the features.

``interaction_pairs``: box-to-box features. Per frame and evaluated agent: centre distances to every object,
the ``k`` nearest kept (the neighbours of TTC, RSS and closest approach), then the exact nearest box distance
and the overlap counts over *all* objects, where a bounding-circle lower bound lets most objects be skipped
without a box test.

``road_edge_distance``: the worst corner's signed distance to the road edge (bilinear SDF lookup).

Why compiled: as torch ops the pairs were ~150 elementwise passes over (frames × agents × neighbours) tensors
plus a top-k over all pairs, ~85 % of the episode-metric time; as a loop every pair is touched once, in cache.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Full fastmath (it lets LLVM vectorise the min/max): so no inf or nan may occur in the loops; "none found" is
# the finite _NONE, turned into inf on the way out.
_FASTMATH = True
_NONE = 1e30
_FAR = 1e9  # m: where invalid objects are parked
_FAR_D2 = 1e16  # m^2: squared distances beyond this involve a parked object


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _corners_to_box(cx, cy, c, s, hl_b, hw_b, hl_a, hw_a):
    """Smallest distance from the 4 corners of box b (centre ``cx, cy``, heading cos/sin ``c, s`` in box a's
    frame, half sizes ``hl_b, hw_b``) to the filled axis-aligned box a (half sizes ``hl_a, hw_a``)."""
    best = _NONE
    for sx, sy in ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)):
        fx, fy = sx * hl_b, sy * hw_b
        px, py = cx + fx * c - fy * s, cy + fx * s + fy * c
        ex, ey = max(abs(px) - hl_a, 0.0), max(abs(py) - hw_a, 0.0)
        best = min(best, ex * ex + ey * ey)
    return math.sqrt(best)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _box_distance(xa, ya, ca, sa, la, wa, xb, yb, cb, sb, lb, wb, above):
    """Signed distance between two oriented boxes (cos/sin of their headings, half sizes): minus the
    penetration depth when they overlap; when separated, the exact distance — unless the separating-axis gap (a
    lower bound) already reaches ``above``, in which case that gap is returned. Returns (value, overlap)."""
    dx, dy = xb - xa, yb - ya
    abx, aby = dx * ca + dy * sa, -dx * sa + dy * ca  # b's centre in a's frame
    bax, bay = -(dx * cb + dy * sb), dx * sb - dy * cb  # a's centre in b's frame
    c_rel, s_rel = cb * ca + sb * sa, sb * ca - cb * sa  # cos / sin of (heading b - heading a)
    cr, sr = abs(c_rel), abs(s_rel)
    depth = max(max(abs(abx) - la - (cr * lb + sr * wb), abs(aby) - wa - (sr * lb + cr * wb)),
                max(abs(bax) - lb - (cr * la + sr * wa), abs(bay) - wb - (sr * la + cr * wa)))
    if depth < 0 or depth >= above:
        return depth, depth < 0
    sep = min(_corners_to_box(abx, aby, c_rel, s_rel, lb, wb, la, wa),
              _corners_to_box(bax, bay, c_rel, -s_rel, la, wa, lb, wb))
    return sep, False


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _insert(nb_d2, nb_idx, k, k_max, dj, j):
    """Insert object j at squared distance dj into the sorted k-nearest list (length k <= k_max); new k."""
    if k == k_max and dj >= nb_d2[k - 1]:
        return k
    p = k if k < k_max else k_max - 1
    while p > 0 and nb_d2[p - 1] > dj:
        nb_d2[p], nb_idx[p] = nb_d2[p - 1], nb_idx[p - 1]
        p -= 1
    nb_d2[p], nb_idx[p] = dj, j
    return min(k + 1, k_max)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
def _exact(fs, i, j, d2, radius, cos_h, sin_h, ext, n_eval, best, overlaps_a, overlaps_c):
    """Fold object j into agent i's nearest box distance and overlap counts, unless the bounding circles prove it
    can neither overlap nor be nearer than ``best``."""
    reach = radius[i] + radius[j] + max(best, 0.0)
    if d2[j] >= reach * reach:
        return best, overlaps_a, overlaps_c
    value, overlap = _box_distance(fs[i, 0], fs[i, 1], cos_h[i], sin_h[i], 0.5 * ext[i, 0], 0.5 * ext[i, 1],
                                   fs[j, 0], fs[j, 1], cos_h[j], sin_h[j], 0.5 * ext[j, 0], 0.5 * ext[j, 1],
                                   best)
    if overlap:
        if j < n_eval:
            overlaps_a += 1
        else:
            overlaps_c += 1
    return min(best, value), overlaps_a, overlaps_c


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _frame(fs, fv, ext, radius, radius_max, n_eval, k_max, params, f, nearest, n_agents, n_context, ttc, follow_gap,
           rss_long, rss_lat, approach, cos_h, sin_h, xs, ys, d2, nb_idx, nb_d2, is_nb, prev_nb, prev_k):
    ttc_cap, max_heading_diff, rho, acc, brk, lat_acc, lat_brk, mu = params
    n = fs.shape[0]
    for j in range(n):
        cos_h[j], sin_h[j] = math.cos(fs[j, 2]), math.sin(fs[j, 2])
        xs[j], ys[j] = (fs[j, 0], fs[j, 1]) if fv[j] else (_FAR, _FAR)
        is_nb[j] = -1
    cos_max = math.cos(max_heading_diff)
    for i in range(n_eval):
        nearest[f, i], n_agents[f, i], n_context[f, i] = _NONE, 0, 0
        ttc[f, i], follow_gap[f, i], rss_long[f, i], rss_lat[f, i], approach[f, i] = ttc_cap, _NONE, False, \
            False, ttc_cap
        if not fv[i]:
            prev_k[i] = 0
            continue
        xi, yi, vxi, vyi = fs[i, 0], fs[i, 1], fs[i, 3], fs[i, 4]
        ca, sa = cos_h[i], sin_h[i]
        hl, hw = 0.5 * ext[i, 0], 0.5 * ext[i, 1]
        # centre distances, and the k nearest: seeded with the previous frame's neighbours (usually the same
        # objects one step later, so their current distances bound the k-th nearest and the scan below rarely
        # inserts), then every other object
        for j in range(n):
            dx, dy = xs[j] - xi, ys[j] - yi
            d2[j] = dx * dx + dy * dy
        d2[i] = _FAR_D2 * 10
        k = 0
        for q in range(prev_k[i]):
            j = prev_nb[i, q]
            is_nb[j] = 2 * i  # considered
            if d2[j] < _FAR_D2:
                k = _insert(nb_d2, nb_idx, k, k_max, d2[j], j)
        thr = nb_d2[k - 1] if k == k_max else _FAR_D2  # only nearer objects can enter the list
        for j in range(n):
            if d2[j] < thr and is_nb[j] != 2 * i:
                k = _insert(nb_d2, nb_idx, k, k_max, d2[j], j)
                thr = nb_d2[k - 1] if k == k_max else _FAR_D2
        prev_k[i] = k
        for q in range(k):
            prev_nb[i, q] = nb_idx[q]
            is_nb[nb_idx[q]] = 2 * i + 1  # a neighbour
        # exact nearest box distance and overlap counts over all objects, neighbours first (tight bound early)
        best, overlaps_a, overlaps_c = _NONE, 0, 0
        for q in range(k):
            best, overlaps_a, overlaps_c = _exact(fs, i, nb_idx[q], d2, radius, cos_h, sin_h, ext, n_eval, best,
                                                  overlaps_a, overlaps_c)
        # then every other object, unless the k-th neighbour's distance proves none can overlap or be nearer
        # (all others are at least that far; fewer than k neighbours means there are no others)
        reach_any = radius[i] + radius_max + max(best, 0.0)
        others = k == k_max and nb_d2[k - 1] < reach_any * reach_any
        for j in range(n if others else 0):
            if is_nb[j] != 2 * i + 1 and d2[j] < _FAR_D2:
                best, overlaps_a, overlaps_c = _exact(fs, i, j, d2, radius, cos_h, sin_h, ext, n_eval, best,
                                                      overlaps_a, overlaps_c)
        nearest[f, i], n_agents[f, i], n_context[f, i] = best, overlaps_a, overlaps_c
        # the neighbours in the agent's frame: followed object (TTC, RSS longitudinal), RSS lateral, approach
        v_own_long, v_own_lat = vxi * ca + vyi * sa, vyi * ca - vxi * sa
        gap, v_lead, lateral, t_min = _NONE, 0.0, False, _NONE
        for q in range(k):
            j = nb_idx[q]
            dx, dy = fs[j, 0] - xi, fs[j, 1] - yi
            lx, ly = dx * ca + dy * sa, dy * ca - dx * sa
            vxj, vyj = fs[j, 3], fs[j, 4]
            # cheap bounds first (j's projected half-extents are at most its circle radius): most neighbours are
            # neither ahead in the lane nor alongside
            ahead = lx > 0 and abs(ly) < hw + radius[j]
            beside = not lateral and abs(lx) < hl + radius[j]
            if ahead or beside:
                c_rel, s_rel = cos_h[j] * ca + sin_h[j] * sa, sin_h[j] * ca - cos_h[j] * sa
                hx = abs(c_rel) * 0.5 * ext[j, 0] + abs(s_rel) * 0.5 * ext[j, 1]
                hy = abs(s_rel) * 0.5 * ext[j, 0] + abs(c_rel) * 0.5 * ext[j, 1]
                if ahead and c_rel >= cos_max and abs(ly) < hw + hy:  # |heading difference| <= max_heading_diff
                    g = lx - hl - hx
                    if g < gap:
                        gap, v_lead = g, vxj * ca + vyj * sa
                if beside and abs(lx) < hl + hx:
                    side = 1.0 if ly >= 0 else -1.0
                    v1, v2 = side * v_own_lat, side * (vyj * ca - vxj * sa)
                    reach1 = (2 * v1 + rho * lat_acc) / 2 * rho + (v1 + rho * lat_acc) ** 2 / (2 * lat_brk)
                    reach2 = (2 * v2 - rho * lat_acc) / 2 * rho - (v2 - rho * lat_acc) ** 2 / (2 * lat_brk)
                    lateral = abs(ly) - hw - hy < mu + max(reach1 - reach2, 0.0)
            # closest approach at constant velocities, if it comes before the cap (later ones read as the cap)
            rvx, rvy = vxj - vxi, vyj - vyi
            dot = dx * rvx + dy * rvy
            rv2 = rvx * rvx + rvy * rvy
            if dot < 0 and -dot < ttc_cap * rv2:
                t_star = -dot / rv2
                mx, my = dx + t_star * rvx, dy + t_star * rvy
                reach = radius[i] + radius[j]
                if mx * mx + my * my < reach * reach:
                    t_min = min(t_min, t_star)
        if gap < _NONE:
            closing = v_own_long - v_lead
            if closing > 0:
                ttc[f, i] = min(max(gap, 0.0) / max(closing, 1e-9), ttc_cap)
            v_r, v_f = max(v_own_long, 0.0), max(v_lead, 0.0)
            d_long = max(v_r * rho + 0.5 * acc * rho**2 + (v_r + rho * acc) ** 2 / (2 * brk) - v_f**2 / (2 * brk), 0.0)
            rss_long[f, i] = gap < d_long
        follow_gap[f, i] = gap
        rss_lat[f, i] = lateral
        approach[f, i] = min(t_min, ttc_cap)


@numba.njit(cache=True, nogil=True, parallel=True)
def interaction_pairs(agents, agents_valid, context, context_valid, ext, k_max, params, n_chunks=16):
    """Features of every evaluated agent against all objects of its frame (the other agents of its sample and
    the context objects).

    agents ``(B, A, T, 5)`` x, y, heading, vx, vy of the evaluated agents, agents_valid ``(B, A, T)`` bool;
    context ``(O, T, 5)`` / context_valid ``(O, T)``: objects shared by every sample (O may be 0); ext
    ``(A + O, 2)`` length, width; k_max: neighbours for TTC / RSS / closest approach; params: TTC cap, max heading
    difference of a followed object, RSS rho, longitudinal accel and brake, lateral accel and brake, lateral
    margin. Returns ``(F, A)`` arrays over the ``F = B * T`` frames (frame ``b * T + t``): nearest (signed box
    distance, inf if alone), overlaps with evaluated / context objects, TTC, follow gap, RSS longitudinal /
    lateral violations, closest-approach time. Frames run in ``n_chunks`` parallel chunks (a fixed number, not
    the thread count: each chunk seeds its neighbour search from its previous frame, so results never depend on
    the number of threads). Each frame's objects are gathered into a small buffer: no frame-major copy.
    """
    n_b, n_eval, n_t = agents_valid.shape
    n_ctx = context.shape[0]
    n = n_eval + n_ctx
    n_f = n_b * n_t
    radius = np.empty(n)
    for j in range(n):
        radius[j] = 0.5 * math.sqrt(ext[j, 0] ** 2 + ext[j, 1] ** 2)
    nearest = np.empty((n_f, n_eval))
    n_agents = np.empty((n_f, n_eval), np.int64)
    n_context = np.empty((n_f, n_eval), np.int64)
    ttc = np.empty((n_f, n_eval))
    follow_gap = np.empty((n_f, n_eval))
    rss_long = np.empty((n_f, n_eval), np.bool_)
    rss_lat = np.empty((n_f, n_eval), np.bool_)
    approach = np.empty((n_f, n_eval))
    k_max = max(min(k_max, n - 1), 1)
    n_chunks = max(min(n_f, n_chunks), 1)
    radius_max = radius.max() if n else 0.0
    for c in numba.prange(n_chunks):
        # scratch buffers once per chunk of frames, not per frame
        fs, fv = np.empty((n, 5), agents.dtype), np.empty(n, np.bool_)
        cos_h, sin_h, xs, ys, d2 = np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n)
        nb_idx, nb_d2, is_nb = np.empty(k_max, np.int64), np.empty(k_max), np.empty(n, np.int64)
        prev_nb, prev_k = np.empty((n_eval, k_max), np.int64), np.zeros(n_eval, np.int64)
        for f in range(c * n_f // n_chunks, (c + 1) * n_f // n_chunks):
            b, t = f // n_t, f % n_t
            for j in range(n_eval):
                fv[j] = agents_valid[b, j, t]
                for q in range(5):
                    fs[j, q] = agents[b, j, t, q]
            for j in range(n_ctx):
                fv[n_eval + j] = context_valid[j, t]
                for q in range(5):
                    fs[n_eval + j, q] = context[j, t, q]
            _frame(fs, fv, ext, radius, radius_max, n_eval, k_max, params, f, nearest, n_agents, n_context, ttc,
                   follow_gap, rss_long, rss_lat, approach, cos_h, sin_h, xs, ys, d2, nb_idx, nb_d2, is_nb, prev_nb,
                   prev_k)
    for f in range(n_f):
        for i in range(n_eval):
            if nearest[f, i] >= _NONE:
                nearest[f, i] = np.inf
            if follow_gap[f, i] >= _NONE:
                follow_gap[f, i] = np.inf
    return nearest, n_agents, n_context, ttc, follow_gap, rss_long, rss_lat, approach


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, parallel=True)
def road_edge_distance(traj, valid, extent, sdf, origin_x, origin_y, resolution):
    """Largest signed distance (m, > 0 beyond the edge) of the 4 box corners, by bilinear lookup in ``sdf``
    ``(H, W)`` (cell centres at ``origin + (index + 0.5) * resolution``; points beyond the grid read its
    border). traj ``(B, A, T, 5)``, valid ``(B, A, T)``, extent ``(A, 2)``; 0 where invalid."""
    n_b, n_a, n_t = valid.shape
    h, w = sdf.shape
    out = np.zeros((n_b, n_a, n_t), np.float32)
    for b in numba.prange(n_b):
        for a in range(n_a):
            hl, hw = 0.5 * extent[a, 0], 0.5 * extent[a, 1]
            for t in range(n_t):
                if not valid[b, a, t]:
                    continue
                x, y, c, s = traj[b, a, t, 0], traj[b, a, t, 1], math.cos(traj[b, a, t, 2]), math.sin(traj[b, a, t, 2])
                worst = -_NONE
                for sx, sy in ((1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)):
                    px, py = x + sx * hl * c - sy * hw * s, y + sx * hl * s + sy * hw * c
                    u = min(max((px - origin_x) / resolution - 0.5, 0.0), w - 1 - 1e-4)
                    v = min(max((py - origin_y) / resolution - 0.5, 0.0), h - 1 - 1e-4)
                    u0, v0 = int(u), int(v)
                    fu, fv = u - u0, v - v0
                    top = sdf[v0, u0] * (1 - fu) + sdf[v0, u0 + 1] * fu
                    bottom = sdf[v0 + 1, u0] * (1 - fu) + sdf[v0 + 1, u0 + 1] * fu
                    worst = max(worst, top * (1 - fv) + bottom * fv)
                out[b, a, t] = worst
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _bin(x, low, width, nb):
    """Histogram bin of ``x`` (float32 arithmetic, as the torch reference); outside the range: the end bins. The
    float is clamped before the integer conversion (truncation equals floor there: negatives land in bin 0)."""
    v = (x - low) / width * np.float32(nb)
    return int(min(max(v, np.float32(0.0)), np.float32(nb - 1)))


@numba.njit(cache=True, nogil=True, parallel=True)
def histogram_likelihoods(sim, sim_valid, log, log_valid, low, width, bins, pseudocount):
    """WOSAC histogram likelihoods of ``F`` features at once (``realism.py`` defines the method; its torch
    functions ``histogram_log_likelihood`` / ``bernoulli_log_likelihood`` are the reference this loop matches).

    sim ``(F, R, A, T)`` float32 simulated values, sim_valid ``(F, R, A, T)`` bool; log ``(F, A, T)`` float32,
    log_valid ``(F, A, T)`` bool; per feature: low ``(F,)`` float32 range start, width ``(F,)`` float32 range
    length, bins ``(F,)`` int64 (0: a boolean feature, scored by its any-over-time value per rollout).
    Returns ``(F, A)`` float64 likelihoods, NaN where the object has no valid logged value. Bins are computed
    in float32 exactly as the torch reference does.
    """
    n_f, n_r, n_a, n_t = sim.shape
    out = np.full((n_f, n_a), np.nan)
    for fa in numba.prange(n_f * n_a):
        f, a = fa // n_a, fa % n_a
        nb = bins[f]
        if nb == 0:
            true, counted = 0.0, 0.0
            for r in range(n_r):
                seen, hit = False, False
                for t in range(n_t):
                    if sim_valid[f, r, a, t]:
                        seen = True
                        hit = hit or sim[f, r, a, t] != 0
                if seen:
                    counted += 1.0
                    true += 1.0 if hit else 0.0
            scored, log_hit = False, False
            for t in range(n_t):
                if log_valid[f, a, t]:
                    scored = True
                    log_hit = log_hit or log[f, a, t] != 0
            if scored:
                p = (true + pseudocount) / (counted + 2 * pseudocount)
                out[f, a] = p if log_hit else 1.0 - p
            continue
        counts = np.zeros(nb)
        for r in range(n_r):
            for t in range(n_t):
                if sim_valid[f, r, a, t]:
                    counts[_bin(sim[f, r, a, t], low[f], width[f], nb)] += 1.0
        total = 0.0
        for k in range(nb):
            counts[k] += pseudocount
            total += counts[k]
        acc, n = 0.0, 0
        for t in range(n_t):
            if log_valid[f, a, t]:
                acc += math.log(counts[_bin(log[f, a, t], low[f], width[f], nb)] / total)
                n += 1
        if n:
            out[f, a] = math.exp(acc / n)
    return out
