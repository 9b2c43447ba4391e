#!/usr/bin/env python3
"""Error of a 3x3 convolution with bf16 operands: direct products against Winograd F(4x4, 3x3).

Why the bf16 path keeps 3x3 convolutions in f32 (README, "bf16 on the CPU"): rounding the
transformed tiles of F(4x4, 3x3) to bf16 costs far more than rounding the direct operands.
Prints max and mean |error| relative to the RMS of the exact (f64) output, for an SD UNet-sized
layer (320 -> 320 channels, 32x32, SiLU'd normal inputs, weights scaled as at initialisation),
with the interpolation points of `winograd.rs` (0, +-1, +-2) and two other sets.

    python scripts/winograd_bf16_error.py
"""
import numpy as np
import torch


def bf16(x):
    return x.to(torch.bfloat16).to(x.dtype)


def transforms(points):
    """A^T (4x6), G (6x3), B^T (6x6) of F(4, 3) on `points` (five finite ones, then infinity)."""
    n, m, r = 6, 4, 3
    p = np.array(points, dtype=np.float64)
    at = np.zeros((m, n))
    g = np.zeros((n, r))
    for j, a in enumerate(p):
        at[:, j] = [a**i for i in range(m)]
        g[j, :] = [a**i for i in range(r)]
        g[j, :] /= np.prod([a - b for k, b in enumerate(p) if k != j])
    at[m - 1, n - 1] = 1
    g[n - 1, r - 1] = 1
    # B^T is what makes A^T [(G w) * (B^T d)] the correlation for every unit d and w.
    rows, rhs = [], []
    for di in range(n):
        for wi in range(r):
            d = np.eye(n)[di]
            w = np.eye(r)[wi]
            y = [sum(d[i + k] * w[k] for k in range(r)) for i in range(m)]
            gw = g @ w
            for i in range(m):
                row = np.zeros((n, n))
                row[:, di] = at[i, :] * gw
                rows.append(row.ravel())
                rhs.append(y[i])
    bt = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0].reshape(n, n)
    return (torch.tensor(t) for t in (at, g, bt))


def winograd(x, w, points, round_bf16):
    at, g, bt = transforms(points)
    c, h, width = x.shape
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    u = torch.einsum("ij,kcjl,ml->kcim", g, w, g)
    tiles = xp.unfold(1, 6, 4).unfold(2, 6, 4)
    v = torch.einsum("ij,cabjl,ml->cabim", bt, tiles, bt)
    if round_bf16:
        u, v = bf16(u), bf16(v)
    m = torch.einsum("kcim,cabim->kabim", u, v)
    y = torch.einsum("ij,kabjl,ml->kabim", at, m, at)
    return y.permute(0, 1, 3, 2, 4).reshape(w.shape[0], h, width)


def main():
    torch.manual_seed(0)
    c = k = 320
    size = 32
    x = torch.nn.functional.silu(torch.randn(c, size, size, dtype=torch.float64))
    w = torch.randn(k, c, 3, 3, dtype=torch.float64) / np.sqrt(c * 9)
    exact = torch.nn.functional.conv2d(x[None], w, padding=1)[0]
    rms = exact.pow(2).mean().sqrt()

    def report(name, y):
        e = (y - exact).abs() / rms
        print(f"{name:34s} max {e.max():.2e}  mean {e.mean():.2e}  (of the output's RMS)")

    report("direct, f32", torch.nn.functional.conv2d(x[None].float(), w.float(), padding=1)[0].double())
    report("direct, bf16 operands", torch.nn.functional.conv2d(bf16(x)[None], bf16(w), padding=1)[0])
    for points in ([0, 1, -1, 2, -2], [0, 1, -1, 0.5, -0.5], [0, -1, 1, 0.5, -2]):
        report(f"F(4x4,3x3) {points}, bf16", winograd(x, w, points, True))


if __name__ == "__main__":
    main()
