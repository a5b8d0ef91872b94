"""The float order of xla_ffi/gemm.h's int4 lm_head kernel (Int4GemmF32), a float sum of scaled
group sums, written out in numpy for tests to compare it with, bit for bit.

Every kernel path keeps 8 float lanes, lane l the exact integer sum of a group's products at
k % 32 in [4l, 4l + 4); it adds each group's scaled lanes in turn (product and sum each rounded in
float32, no fused multiply-add) and sums the lanes last: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
"""

import numpy as np


def lane_sums(x_q, w_nk, group: int):
    """p [M, N, K / group, 8]: the exact int64 lane sums of x_q [M, K] times w [N, K] (K a multiple
    of the group, the group a multiple of 32)."""
    m, k = x_q.shape
    prod = np.asarray(x_q, np.int64)[:, None, :] * np.asarray(w_nk, np.int64)[None]  # [M, N, K]
    return prod.reshape(m, w_nk.shape[0], k // group, group // 32, 8, 4).sum(axis=(3, 5))


def sum_in_lane_order(p, scale_nc):
    """float32 [M, N]: lane sums p [M, N, C, 8] scaled by scale [N, C] and added in gemm.h's order."""
    p = np.asarray(p, np.float32)
    s = np.asarray(scale_nc, np.float32)
    lane = np.zeros(p.shape[:2] + (8,), np.float32)
    for c in range(p.shape[2]):
        lane = lane + p[:, :, c, :] * s[None, :, c, None]
    l = [lane[..., i] for i in range(8)]  # noqa: E741
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
