"""The episode metrics' inner loops, compiled (numba) over plain numpy arrays; ``features.py``, ``realism.py``
and ``blm.py`` document what they compute and call them.

``interaction_pairs``: box-to-box features. Per frame and evaluated agent: centre distances to every object and
the ``k`` nearest (the neighbours of RSS and closest approach); the exact rounded-box distance to the nearest
centre bounds the nearest-object distance from above, and with the reach of the time to collision it leaves the
objects that can matter (about 4 per agent and frame on dense towns scenes, of ~50); one branch-free pass over
those counts the overlaps (sharp boxes, exact separating-axis test), bounds each rounded-box distance from below
(the separating-axis depth of the boxes' cores) and finds the WOSAC time-to-collision candidates; the exact
rounded-box distance is computed only where that bound is below the best so far.

``kinematics``: the central-difference speeds, accelerations and jerk (BLM, planning). ``wosac_kinematics`` and
``wosac_log_likelihoods``: the WOSAC kinematic features and the pooled histogram / Bernoulli log-likelihoods of
every realism feature, as the official code computes them. ``bin_counts``, ``displacement``, ``final_spread``,
``safety_totals``, ``all_finite_where_valid``: the JSD histograms, ADE / FDE, FDD, the BLM safety totals and the
NaN check of the inputs.

Why compiled: as torch ops the pairs were ~150 elementwise passes over (frames × agents × neighbours) tensors
plus a top-k over all pairs, ~85 % of the episode-metric time; as a loop every pair is touched once, in cache.
The rest followed once the pairs were fast: a masked torch reduction over a (rollouts × agents × steps) tensor
costs 50-1000 µs (strided views, boolean temporaries), one pass of a loop a fraction of that; together they had
become half of the metric time.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from envs.parallel import parallel_kernel

# Full fastmath (it lets LLVM vectorise the min/max): so no inf or nan may occur in the loops; "none found" is
# the finite _NONE, turned into inf on the way out.
_FASTMATH = True
_NONE = 1e30
_FAR = 1e9  # m: where invalid objects are parked
_FAR_D2 = 1e16  # m^2: squared distances beyond this involve a parked object
NO_OBJECT = 1e10  # m: the nearest-object distance where no other object is valid (WOSAC)
CORNER_ROUNDING = 0.7  # WOSAC boxes: corners rounded with radius 0.7 x half the shorter side


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
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


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")
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
def _rounded(xa, ya, ca, sa, la, wa, ra, xb, yb, cb, sb, lb, wb, rb, above):
    """Distance between two boxes with rounded corners (centre, heading cos / sin, half sizes, corner radius):
    that of their cores (each box shrunk by its radius) minus both radii; a lower bound where it is above
    ``above``."""
    value, _ = _box_distance(xa, ya, ca, sa, la - ra, wa - ra, xb, yb, cb, sb, lb - rb, wb - rb, above + ra + rb)
    return value - ra - rb


# rows of a frame's scratch table (one column per object): parked centres, heading cos / sin, then per evaluated
# agent its view of every object (centre in the agent's frame, relative heading cos / sin, half-extents along
# the agent's axes), the agent's centre in the object's frame, and the lower bound of their rounded-box distance
_XS, _YS, _COS, _SIN, _EXCL, _LOWER, _KEY = range(7)
_ROWS = 7


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _frame(fs, fv, fspeed, half_l, half_w, radius, radius_max, shrink, n_eval, wosac, k_max, params, b, t, nearest,
           n_agents, n_context, ttc, rss_long, rss_lat, approach, tab, nb_idx, nb_d2, prev_nb, prev_k, cand):
    """One frame: ``fs`` ``(5, n)`` float32 x, y, heading, vx, vy of its objects (the evaluated agents first),
    ``fv`` their validity, ``fspeed`` the agents' speeds; writes the features of step ``t`` of sample ``b``."""
    ttc_cap, max_heading_diff, small_heading_diff, small_overlap, rho, acc, brk, lat_acc, lat_brk, mu = params
    n = fs.shape[1]
    px, py, ph, pvx, pvy = fs[0], fs[1], fs[2], fs[3], fs[4]
    xs, ys, cos_h, sin_h, excluded = tab[_XS], tab[_YS], tab[_COS], tab[_SIN], tab[_EXCL]
    lower, key = tab[_LOWER], tab[_KEY]
    d2 = np.empty(n)
    for j in range(n):
        cos_h[j], sin_h[j] = math.cos(ph[j]), math.sin(ph[j])
        xs[j], ys[j] = (px[j], py[j]) if fv[j] else (_FAR, _FAR)
        excluded[j] = 0.0 if fv[j] and wosac[j] else _NONE
    cos_max = math.cos(max_heading_diff)
    for i in range(n_eval):
        # an invalid agent: every feature 0 / False
        nearest[b, i, t], n_agents[b, i, t], n_context[b, i, t] = _NONE, 0, 0
        ttc[b, i, t], rss_long[b, i, t], rss_lat[b, i, t], approach[b, i, t] = 0.0, False, False, 0.0
        if not fv[i]:
            prev_k[i] = 0
            continue
        xi, yi, vxi, vyi = px[i], py[i], pvx[i], pvy[i]
        ca, sa = cos_h[i], sin_h[i]
        hl, hw, si = half_l[i], half_w[i], shrink[i]
        # centre distances (a loop of its own: it vectorises), and the k nearest: seeded with the previous frame's
        # neighbours (usually the same objects one step later, so their current distances bound the k-th nearest
        # and the scan below rarely inserts), then every other object
        for j in range(n):
            dx, dy = xs[j] - xi, ys[j] - yi
            d2[j] = dx * dx + dy * dy
        d2[i] = _FAR_D2 * 10
        # the k nearest by (distance, index): usually still the previous frame's neighbours — the farthest of them
        # bounds the k-th distance, and a count (it vectorises) proves no other object is as near — else a
        # selection over every object
        k = prev_k[i]
        thr, same = -1.0, k == k_max
        for q in range(k):
            dj = d2[prev_nb[i, q]]
            thr = max(thr, dj)
            same &= dj < _FAR_D2
        if same:
            within = 0
            for j in range(n):
                within += d2[j] <= thr
            same = within == k_max
        if same:
            for q in range(k):
                nb_idx[q] = prev_nb[i, q]
                nb_d2[q] = d2[nb_idx[q]]
        else:
            k = 0
            for j in range(n):
                if d2[j] < _FAR_D2:
                    k = _insert(nb_d2, nb_idx, k, k_max, d2[j], j)
            prev_k[i] = k
            for q in range(k):
                prev_nb[i, q] = nb_idx[q]
        v_i = fspeed[i]
        reach_t2 = (ttc_cap * v_i + hl + radius_max) ** 2 + (hw + radius_max) ** 2
        hi = ph[i]
        # an upper bound on the nearest rounded-box distance: the exact one to the nearest WOSAC object's centre
        # (among the k nearest; if none is, no bound and every object below is looked at)
        best, first = _NONE, -1
        for q in range(k):
            j = nb_idx[q]
            if excluded[j] == 0.0:
                best, first = _rounded(xi, yi, ca, sa, hl, hw, si, px[j], py[j], cos_h[j], sin_h[j], half_l[j],
                                       half_w[j], shrink[j], best), j
                break
        # the objects that can matter: a box at a larger centre distance can neither overlap, nor be nearer than
        # that bound (its distance is at least the centre distance less both circle radii), nor be followed
        reach = max(math.sqrt(reach_t2), max(best, 0.0) + radius[i] + radius_max)
        reach2 = min(reach * reach, _FAR_D2)  # never the agent itself nor a parked (invalid) object
        m = 0
        for j in range(n):  # branch-free (the test is rarely true); ascending indices, the ties' order below
            cand[m] = j
            m += d2[j] < reach2
        # each of them as the agent sees it, in one branch-free pass: the separating-axis depth of the sharp boxes
        # (< 0: they overlap; the test is exact) counts the overlaps; that of the cores of the rounded boxes (each
        # box shrunk by its corner radius) bounds their distance from below; and the WOSAC time to collision's
        # candidates (an object followed: headed within the maximum difference, headings not wrapped, entirely
        # ahead of the front, overlapping the lane laterally by at least the small overlap or headed within the
        # small difference; near enough to be reached within the cap — beyond that centre distance its TTC, and
        # that of the nearest followed object if it is one of them, is the cap) get their longitudinal gap as key,
        # the others _NONE
        overlaps_a, overlaps_c = 0, 0
        la, wa = hl - si, hw - si
        for p in range(m):
            j = cand[p]
            dx, dy = px[j] - xi, py[j] - yi
            cj, sj = cos_h[j], sin_h[j]
            lx, ly = dx * ca + dy * sa, dy * ca - dx * sa
            bx, by = -(dx * cj + dy * sj), dx * sj - dy * cj
            acr, asr = abs(cj * ca + sj * sa), abs(sj * ca - cj * sa)
            hx, hy = acr * half_l[j] + asr * half_w[j], asr * half_l[j] + acr * half_w[j]
            ax, ay = acr * hl + asr * hw, asr * hl + acr * hw
            alx, aly, abx, aby = abs(lx), abs(ly), abs(bx), abs(by)
            depth = max(max(alx - hl - hx, aly - hw - hy), max(abx - half_l[j] - ax, aby - half_w[j] - ay))
            hit = fv[j] & (depth < 0)
            overlaps_a += hit & (j < n_eval)
            overlaps_c += hit & (j >= n_eval)
            lb, wb = half_l[j] - shrink[j], half_w[j] - shrink[j]
            core = max(max(alx - la - (acr * lb + asr * wb), aly - wa - (asr * lb + acr * wb)),
                       max(abx - lb - (acr * la + asr * wa), aby - wb - (asr * la + acr * wa)))
            lower[j] = core - si - shrink[j] + excluded[j]  # + _NONE: not a WOSAC object, or invalid
            yaw = abs(ph[j] - hi)
            long_d, lat = lx - hl - hx, aly - hw - hy
            follow = (excluded[j] == 0.0) & (d2[j] < reach_t2) & (yaw <= max_heading_diff) & (long_d > 0) & \
                (lat < 0) & ((lat < -small_overlap) | (yaw <= small_heading_diff))
            key[j] = long_d if follow else _NONE
        # the nearest rounded-box distance over the WOSAC objects: the exact distance of each other object whose
        # lower bound is below the best so far (usually none: the nearest centre's box is usually the nearest box)
        if first >= 0:
            lower[first] = _NONE  # its exact distance is the bound
        for p in range(m):
            j = cand[p]
            if lower[j] < best:
                best = min(best, _rounded(xi, yi, ca, sa, hl, hw, si, px[j], py[j], cos_h[j], sin_h[j], half_l[j],
                                          half_w[j], shrink[j], best))
        nearest[b, i, t], n_agents[b, i, t], n_context[b, i, t] = best, overlaps_a, overlaps_c
        # WOSAC time to collision: with the candidate of the smallest gap (ties: the lower index)
        ttc[b, i, t] = ttc_cap
        if v_i >= 0.0:  # a speed (negative: none, e.g. at the last step of the scene)
            follow_d, follow_v = _NONE, 0.0
            for p in range(m):
                j = cand[p]
                if key[j] < follow_d:
                    follow_d, follow_v = key[j], fspeed[j]
            if follow_d < _NONE and follow_v >= 0.0 and v_i - follow_v > 0:
                ttc[b, i, t] = min(follow_d / (v_i - follow_v), ttc_cap)
        # the neighbours in the agent's frame: followed object (RSS longitudinal; ties: the lower index), RSS
        # lateral, approach
        v_own_long, v_own_lat = vxi * ca + vyi * sa, vyi * ca - vxi * sa
        gap, v_lead, lead, lateral, t_min = _NONE, 0.0, -1, False, _NONE
        for q in range(k):
            j = nb_idx[q]
            dx, dy = px[j] - xi, py[j] - yi
            lx, ly = dx * ca + dy * sa, dy * ca - dx * sa
            vxj, vyj = pvx[j], pvy[j]
            # cheap bounds first (j's projected half-extents are at most its circle radius): most neighbours are
            # neither ahead in the lane nor alongside
            ahead = lx > 0 and abs(ly) < hw + radius[j]
            beside = not lateral and abs(lx) < hl + radius[j]
            if ahead or beside:
                c_rel, s_rel = cos_h[j] * ca + sin_h[j] * sa, sin_h[j] * ca - cos_h[j] * sa
                hx = abs(c_rel) * half_l[j] + abs(s_rel) * half_w[j]
                hy = abs(s_rel) * half_l[j] + abs(c_rel) * half_w[j]
                if ahead and c_rel >= cos_max and abs(ly) < hw + hy:  # |heading difference| <= max_heading_diff
                    g = lx - hl - hx
                    if g < gap or (g == gap and j < lead):
                        gap, v_lead, lead = g, vxj * ca + vyj * sa, j
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
            reach = radius[i] + radius[j]
            # |d + t* rv|^2 = |d|^2 - dot^2 / rv2 at t* = -dot / rv2: the test without a division
            if dot < 0 and -dot < ttc_cap * rv2 and nb_d2[q] * rv2 - dot * dot < reach * reach * rv2:
                t_min = min(t_min, -dot / rv2)
        if gap < _NONE:
            v_r, v_f = max(v_own_long, 0.0), max(v_lead, 0.0)
            d_long = max(v_r * rho + 0.5 * acc * rho**2 + (v_r + rho * acc) ** 2 / (2 * brk) - v_f**2 / (2 * brk), 0.0)
            rss_long[b, i, t] = gap < d_long
        rss_lat[b, i, t] = lateral
        approach[b, i, t] = min(t_min, ttc_cap)


@parallel_kernel
def interaction_pairs(agents, agents_valid, speed, context, context_valid, ext, wosac, k_max, params, n_chunks=16):
    """Features of every evaluated agent against all objects of its frame (the other agents of its sample and
    the context objects).

    agents ``(B, A, T, 5)`` x, y, heading, vx, vy of the evaluated agents, agents_valid ``(B, A, T)`` bool; speed
    ``(B, A, T)`` their speeds from central differences of positions (m/s; negative where there is none);
    context ``(O, T, 5)`` / context_valid ``(O, T)``: objects shared by every sample (O may be 0); ext ``(A + O,
    2)`` length, width; wosac ``(A,)`` bool: the evaluated agents that are objects of the WOSAC features (valid at
    the current step); k_max: neighbours for RSS / closest approach; params: TTC cap, max heading difference of a
    followed object, the stricter one for a small lateral overlap and that overlap (m), RSS rho, longitudinal
    accel and brake, lateral accel and brake, lateral margin. Returns ``(B, A, T)`` arrays (floats in the dtype of
    ``agents``): the nearest rounded-box distance to a WOSAC object (``NO_OBJECT`` where there is none), overlaps
    with evaluated / context objects (sharp boxes), the WOSAC time to collision, RSS longitudinal / lateral
    violations, closest-approach time; 0 / False for invalid agents. Frames run in ``n_chunks`` parallel chunks (a
    fixed number, not the thread count: each chunk seeds its neighbour search from its previous frame, so results
    never depend on the number of threads). Each frame's objects are gathered into a small buffer.
    """
    n_b, n_eval, n_t = agents_valid.shape
    n_ctx = context.shape[0]
    n = n_eval + n_ctx
    n_f = n_b * n_t
    radius, shrink, half_l, half_w = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    is_wosac = np.zeros(n, np.bool_)
    for j in range(n):
        half_l[j], half_w[j] = 0.5 * ext[j, 0], 0.5 * ext[j, 1]
        radius[j] = 0.5 * math.sqrt(ext[j, 0] ** 2 + ext[j, 1] ** 2)
        shrink[j] = CORNER_ROUNDING * 0.5 * min(ext[j, 0], ext[j, 1])
        is_wosac[j] = j < n_eval and wosac[j]
    shape = (n_b, n_eval, n_t)
    nearest, ttc, approach = np.empty(shape, agents.dtype), np.empty(shape, agents.dtype), np.empty(shape, agents.dtype)
    n_agents, n_context = np.empty(shape, np.int64), np.empty(shape, np.int64)
    rss_long, rss_lat = np.empty(shape, np.bool_), np.empty(shape, np.bool_)
    k_max = max(min(k_max, n - 1), 1)
    n_chunks = max(min(n_f, n_chunks), 1)
    radius_max = radius.max() if n else 0.0
    for c in numba.prange(n_chunks):
        # scratch buffers once per chunk of frames, not per frame
        fs, fv, fspeed = np.zeros((5, n), agents.dtype), np.empty(n, np.bool_), np.full(n, -1.0)
        tab = np.zeros((_ROWS, n))
        nb_idx, nb_d2 = np.empty(k_max, np.int64), np.empty(k_max)
        prev_nb, prev_k = np.empty((n_eval, k_max), np.int64), np.zeros(n_eval, np.int64)
        cand = np.empty(n, np.int64)
        for f in range(c * n_f // n_chunks, (c + 1) * n_f // n_chunks):
            b, t = f // n_t, f % n_t
            for j in range(n_eval):
                fv[j] = agents_valid[b, j, t]
                v = speed[b, j, t]
                fspeed[j] = v if v >= 0.0 else -1.0  # NaN too
                for q in range(5):
                    fs[q, j] = agents[b, j, t, q]
            for j in range(n_ctx):
                fv[n_eval + j] = context_valid[j, t]
                for q in range(5):
                    fs[q, n_eval + j] = context[j, t, q]
            _frame(fs, fv, fspeed, half_l, half_w, radius, radius_max, shrink, n_eval, is_wosac, k_max, params, b, t,
                   nearest, n_agents, n_context, ttc, rss_long, rss_lat, approach, tab, nb_idx, nb_d2, prev_nb, prev_k,
                   cand)
    for b in numba.prange(n_b):
        for i in range(n_eval):
            for t in range(n_t):
                if nearest[b, i, t] >= _NONE:
                    nearest[b, i, t] = NO_OBJECT if agents_valid[b, i, t] else 0.0
    return nearest, n_agents, n_context, ttc, rss_long, rss_lat, approach


@numba.njit(cache=True, nogil=True, inline="always")
def _bin(x, low, width, nb):
    """Histogram bin of ``x`` (float32 arithmetic, as the torch reference); outside the range: the end bins. The
    float is clamped before the integer conversion (truncation equals floor there: negatives land in bin 0)."""
    v = (x - low) / width * np.float32(nb)
    return int(min(max(v, np.float32(0.0)), np.float32(nb - 1)))


@numba.njit(cache=True, nogil=True, inline="always")
def _wrap(angle):
    """Wrap to [-pi, pi) as ``envs.geometry.wrap_angle`` (``(angle + pi) % (2 pi) - pi``), by a floor instead of
    the float modulo (a library call, 40 % of the kinematics pass)."""
    a = angle + math.pi
    return a - 2 * math.pi * math.floor(a * (1 / (2 * math.pi))) - math.pi


@parallel_kernel
def kinematics(traj, valid, dt, start):
    """Central-difference kinematics of ``N`` tracks (``features.kinematic_features`` documents them).

    traj ``(N, T, 5)`` x, y, heading, vx, vy (velocities unused); valid ``(N, T)`` bool; dt: s per step; start:
    first step written out. Returns values ``(5, N, T - start)`` (speed, acceleration, jerk, angular speed,
    angular acceleration; the dtype of ``traj``) and their validity ``(5, N, T - start)`` bool; 0 where invalid.
    A difference at step t needs steps t - 1, t, t + 1 valid, so the first and last steps are never valid.
    """
    n, n_t = valid.shape
    out = np.zeros((5, n, n_t - start), traj.dtype)
    ok = np.zeros((5, n, n_t - start), np.bool_)
    inv = 1.0 / (2.0 * dt)
    for i in numba.prange(n):
        # per track: speed / angular speed (same validity), acceleration / angular acceleration, jerk
        d1, d1_ok = np.zeros((2, n_t)), np.zeros(n_t, np.bool_)
        d2, d2_ok = np.zeros((2, n_t)), np.zeros(n_t, np.bool_)
        for t in range(1, n_t - 1):
            if valid[i, t - 1] and valid[i, t] and valid[i, t + 1]:
                dx, dy = traj[i, t + 1, 0] - traj[i, t - 1, 0], traj[i, t + 1, 1] - traj[i, t - 1, 1]
                d1[0, t] = math.sqrt(dx * dx + dy * dy) * inv
                d1[1, t] = _wrap(traj[i, t + 1, 2] - traj[i, t - 1, 2]) * inv
                d1_ok[t] = True
        for t in range(1, n_t - 1):
            if d1_ok[t - 1] and d1_ok[t] and d1_ok[t + 1]:
                d2[0, t] = (d1[0, t + 1] - d1[0, t - 1]) * inv
                d2[1, t] = (d1[1, t + 1] - d1[1, t - 1]) * inv
                d2_ok[t] = True
        for t in range(max(start, 1), n_t - 1):
            s = t - start
            if d1_ok[t]:
                out[0, i, s], out[3, i, s] = d1[0, t], d1[1, t]
                ok[0, i, s], ok[3, i, s] = True, True
            if d2_ok[t]:
                out[1, i, s], out[4, i, s] = d2[0, t], d2[1, t]
                ok[1, i, s], ok[4, i, s] = True, True
                if d2_ok[t - 1] and d2_ok[t + 1]:
                    out[2, i, s] = (d2[0, t + 1] - d2[0, t - 1]) * inv
                    ok[2, i, s] = True
    return out, ok


@numba.njit(cache=True, nogil=True)
def all_finite_where_valid(values, valid):
    """Whether every row ``values[i]`` (``(N, K)``) with ``valid[i]`` (``(N,)`` bool) is finite (no NaN / inf)."""
    for i in range(valid.shape[0]):
        if valid[i]:
            for k in range(values.shape[1]):
                if not math.isfinite(values[i, k]):
                    return False
    return True


@numba.njit(cache=True, nogil=True)
def bin_counts(values, valid, low, width, nb):
    """Counts ``(nb,)`` float64 of the valid entries of ``values`` (1-D, float32, ``valid`` 1-D bool) in ``nb``
    equal bins of ``[low, low + width]``; values outside land in the end bins (float32 binning, as ``_bin``)."""
    counts = np.zeros(nb)
    low32, width32 = np.float32(low), np.float32(width)
    for i in range(values.shape[0]):
        if valid[i]:
            counts[_bin(values[i], low32, width32, nb)] += 1.0
    return counts


@numba.njit(cache=True, nogil=True)
def displacement(sim, sim_valid, log, log_valid, start):
    """Position errors of ``R`` rollouts against the log from step ``start`` on: sim ``(R, A, T, 5)``, sim_valid
    ``(R, A, T)``, log ``(A, T, 5)``, log_valid ``(A, T)``. Returns ``(R, A)`` ADE (m: the errors summed over the
    steps where both are valid, over the number of valid logged steps of the whole track — the official WOSAC
    definition, whose history steps add no error), the error at the last such step (m) and the number of such
    steps; 0 where there are none."""
    n_r, n_a, n_t = sim_valid.shape
    ade, fde = np.zeros((n_r, n_a)), np.zeros((n_r, n_a))
    count = np.zeros((n_r, n_a), np.int64)
    for a in range(n_a):
        logged = 0
        for t in range(n_t):
            logged += log_valid[a, t]
        for r in range(n_r):
            acc, last, n = 0.0, 0.0, 0
            for t in range(start, n_t):
                if sim_valid[r, a, t] and log_valid[a, t]:
                    dx, dy = sim[r, a, t, 0] - log[a, t, 0], sim[r, a, t, 1] - log[a, t, 1]
                    last = math.sqrt(dx * dx + dy * dy)
                    acc += last
                    n += 1
            if n:
                ade[r, a], fde[r, a], count[r, a] = acc / logged, last, n
    return ade, fde, count


@parallel_kernel
def safety_totals(own_valid, overlaps_agents, overlaps_context, offroad, offroad_valid, vehicle, approach, rss_long,
                  rss_lat):
    """Per-sample totals of BLM's safety set (``blm.blm_safety`` defines the metrics), one pass over ``(R, A, T)``.

    own_valid ``(R, A, T)`` bool (the agents' validity, which also gates the pair features), overlaps_agents /
    overlaps_context int64, offroad / offroad_valid bool, vehicle ``(A,)`` bool, approach (closest-approach time,
    s), rss_long / rss_lat bool. Returns ``(R, 7)`` float64: valid agent-steps, overlapping pairs (evaluated pairs
    once), off-road vehicle-steps, valid vehicle-steps, minimum closest-approach time (inf if none), RSS
    longitudinal and lateral violations.
    """
    n_r, n_a, n_t = own_valid.shape
    out = np.zeros((n_r, 7))
    for r in numba.prange(n_r):
        steps, pairs, off, veh, ttc_min, long_, lat = 0.0, 0.0, 0.0, 0.0, np.inf, 0.0, 0.0
        for a in range(n_a):
            for t in range(n_t):
                if own_valid[r, a, t]:
                    steps += 1.0
                    pairs += 0.5 * overlaps_agents[r, a, t] + overlaps_context[r, a, t]
                    ttc_min = min(ttc_min, approach[r, a, t])
                    long_ += rss_long[r, a, t]
                    lat += rss_lat[r, a, t]
                if vehicle[a] and offroad_valid[r, a, t]:
                    veh += 1.0
                    off += offroad[r, a, t]
        out[r, 0], out[r, 1], out[r, 2], out[r, 3], out[r, 4], out[r, 5], out[r, 6] = \
            steps, pairs, off, veh, ttc_min, long_, lat
    return out


@numba.njit(cache=True, nogil=True)
def final_spread(sim, sim_valid, start):
    """Per agent, the mean distance (m) between the final positions of every two rollouts (each rollout's last
    valid step at or after ``start``): sim ``(R, A, T, 5)``, sim_valid ``(R, A, T)``. Returns ``(A,)`` float64
    spreads and ``(A,)`` bool, whether the agent has a final position in at least two rollouts (else 0)."""
    n_r, n_a, n_t = sim_valid.shape
    spread, has = np.zeros(n_a), np.zeros(n_a, np.bool_)
    xs, ys = np.empty(n_r), np.empty(n_r)
    for a in range(n_a):
        m = 0
        for r in range(n_r):
            for t in range(n_t - 1, start - 1, -1):
                if sim_valid[r, a, t]:
                    xs[m], ys[m] = sim[r, a, t, 0], sim[r, a, t, 1]
                    m += 1
                    break
        if m < 2:
            continue
        total = 0.0
        for p in range(m):
            for q in range(p + 1, m):
                total += math.sqrt((xs[p] - xs[q]) ** 2 + (ys[p] - ys[q]) ** 2)
        spread[a], has[a] = total / (m * (m - 1) / 2), True
    return spread, has


@numba.njit(cache=True, nogil=True, inline="always")
def _wrap_half(d):
    """The official heading-difference wrap: ``wrap(2 d) / 2`` (2 d wrapped to [-pi, pi))."""
    return _wrap(2.0 * d) / 2.0


@parallel_kernel
def wosac_kinematics(traj, valid, dt, history, is_log):
    """The WOSAC kinematic features of ``N`` tracks, as the official code computes them.

    traj ``(N, T, 5)`` (x, y, heading used; invalid steps as stored), valid ``(N, T)``; history: the number of
    leading logged steps; is_log ``(N,)`` bool: which tracks are logs (scored) rather than rollouts (pooled).
    Values on the raw arrays by central differences: speed ``|p[t+1] - p[t-1]| / (2 dt)``, acceleration its central
    difference, angular speed ``wrap(h[t+1] - h[t-1]) / (2 dt)``, angular acceleration the wrapped central
    difference of that, NaN where a difference runs past either end of the scene.

    Returns values ``(4, N, T - history)`` float32 (computed in float64: speed, acceleration, angular speed, angular
    acceleration) for
    the future steps and ``(4, N, T - history)`` bool ``use``: for a log, the official scoring validity (from the
    future steps' validity alone: speeds need steps t - 1 and t + 1 valid, accelerations speeds at t - 1 and
    t + 1, so speed is never scored at the first future step, accelerations not at the first two); for a rollout,
    whether the value enters its histogram: the step is valid and no difference reaches into an invalid simulated
    step (under the WOSAC protocol every simulated step is valid and every value enters).
    """
    n, n_t = valid.shape
    n_f = n_t - history
    out = np.full((4, n, n_f), np.nan, np.float32)
    use = np.zeros((4, n, n_f), np.bool_)
    inv = 1.0 / (2.0 * dt)
    for i in numba.prange(n):
        sp, dh = np.full(n_t, np.nan), np.full(n_t, np.nan)  # speed, heading change per step
        for t in range(1, n_t - 1):
            dx, dy = traj[i, t + 1, 0] - traj[i, t - 1, 0], traj[i, t + 1, 1] - traj[i, t - 1, 1]
            sp[t] = math.sqrt(dx * dx + dy * dy) * inv
            dh[t] = _wrap_half(0.5 * (traj[i, t + 1, 2] - traj[i, t - 1, 2]))
        for t in range(history, n_t):
            s = t - history
            out[0, i, s], out[2, i, s] = sp[t], dh[t] / dt
            if 1 <= t < n_t - 1:
                out[1, i, s] = (sp[t + 1] - sp[t - 1]) * inv
                out[3, i, s] = _wrap_half(0.5 * (dh[t + 1] - dh[t - 1])) / (dt * dt)
        for s in range(n_f):
            t = history + s
            if is_log[i]:
                use[0, i, s] = use[2, i, s] = _log_speed_ok(valid, i, t, history)
                use[1, i, s] = use[3, i, s] = _log_speed_ok(valid, i, t - 1, history) and \
                    _log_speed_ok(valid, i, t + 1, history)
            else:
                use[0, i, s] = use[2, i, s] = valid[i, t] and _sim_ok(valid, i, t - 1, history) and \
                    _sim_ok(valid, i, t + 1, history)
                use[1, i, s] = use[3, i, s] = use[0, i, s] and _sim_ok(valid, i, t - 2, history) and \
                    _sim_ok(valid, i, t + 2, history)
    return out, use


@numba.njit(cache=True, nogil=True, inline="always")
def _log_speed_ok(valid, i, t, history):
    """The official speed validity at step t of the future (its steps alone: t - 1 and t + 1 valid)."""
    return history <= t - 1 and t + 1 < valid.shape[1] and valid[i, t - 1] and valid[i, t + 1]


@numba.njit(cache=True, nogil=True, inline="always")
def _sim_ok(valid, i, t, history):
    """Whether step t may enter a rollout's difference: the logged history, beyond the scene (NaN), or valid."""
    return t < history or t >= valid.shape[1] or valid[i, t]


@numba.njit(cache=True, nogil=True, inline="always")
def _bin_or_top(x, low, width, nb):
    """``_bin``, except that NaN lands in the top bin (as in the official histograms)."""
    if x != x:
        return nb - 1
    return _bin(x, low, width, nb)


@parallel_kernel
def wosac_log_likelihoods(values, use, n_sim, low, width, bins, pseudocount, bool_pseudocount, objects):
    """The WOSAC log-likelihoods of ``F`` features, pooled as the official metric pools them.

    values: a tuple of ``F`` float32 arrays ``(R + 1, A, T)`` (rows ``< n_sim`` = R rollouts, row ``n_sim`` the
    log; NaN allowed: it lands in the top bin); use: the matching bool arrays — for rollout rows whether a value
    enters the histogram, for the log row whether it is scored (and, for a boolean feature, the steps whose
    simulated values count too: the official metric masks them by the log's validity). low / width ``(F,)``
    float32 ranges, bins ``(F,)`` int64 (0: a boolean feature); objects ``(A,)`` bool, the objects to score (the
    others get 0 and a count of 0).

    Time series: per object, a histogram of its pooled rollout values (``bins`` equal bins, values clipped into the
    end bins, ``pseudocount`` added to each); every scored log value contributes the log-probability of its bin.
    Booleans: per object, how many rollouts are ever true over the log-masked steps, a two-bin histogram with
    ``bool_pseudocount``, and the log-probability of the log's own any-over-time value; every object contributes.
    Returns ``(F, A)`` float64 summed log-likelihoods and ``(F, A)`` float64 counts (scored values; 1 for each
    object of a boolean feature), so that the feature's likelihood is ``exp(sum / count)`` over the objects.
    """
    n_f = len(values)
    n_r, n_a, n_t = n_sim, values[0].shape[1], values[0].shape[2]
    total, count = np.zeros((n_f, n_a)), np.zeros((n_f, n_a))
    for fa in numba.prange(n_f * n_a):
        f, a = fa // n_a, fa % n_a
        if not objects[a]:
            continue
        x, ok = values[f], use[f]
        nb = bins[f]
        if nb == 0:
            true = 0.0
            for r in range(n_r):
                hit = False
                for t in range(n_t):
                    hit = hit or (ok[n_r, a, t] and ok[r, a, t] and x[r, a, t] != 0)
                true += 1.0 if hit else 0.0
            log_hit = False
            for t in range(n_t):
                log_hit = log_hit or (ok[n_r, a, t] and x[n_r, a, t] != 0)
            p = (true + bool_pseudocount) / (n_r + 2 * bool_pseudocount)
            total[f, a], count[f, a] = math.log(p if log_hit else 1.0 - p), 1.0
            continue
        counts = np.zeros(nb)
        for r in range(n_r):
            for t in range(n_t):
                if ok[r, a, t]:
                    counts[_bin_or_top(x[r, a, t], low[f], width[f], nb)] += 1.0
        norm = 0.0
        for k in range(nb):
            counts[k] += pseudocount
            norm += counts[k]
        acc, m = 0.0, 0
        for t in range(n_t):
            if ok[n_r, a, t]:
                acc += math.log(counts[_bin_or_top(x[n_r, a, t], low[f], width[f], nb)] / norm)
                m += 1
        total[f, a], count[f, a] = acc, m
    return total, count
