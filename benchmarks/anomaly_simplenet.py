"""Does a trained second scorer, SimpleNet's patch discriminator, help pixel AUROC on magnetic
tiles? One run: the shipped bank's raw-distance map, each discriminator's map, and their sum.

SimpleNet (Liu et al. 2023, "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR; reference implementation github.com/DonaldRR/SimpleNet) is the
normalising-flow-free scorer that learns from good images alone: a feature adaptor (one
linear layer) maps the frozen backbone's patch features, anomalous features are made by
adding Gaussian noise ``N(0, sigma^2 I)`` to the adapted good ones, and a discriminator
(linear 1024, batch norm, leaky ReLU 0.2, linear 1) is trained with SimpleNet's truncated L1
loss (margin 0.5) to score good above noisy; a test patch's anomaly score is minus the
discriminator's output. Adam, learning rates 1e-4 (adaptor) and 2e-4 (discriminator, weight
decay 1e-5), as the reference; batches of 2,048 patches; ``sigma`` is in units of each
channel's good-patch standard deviation (the bank's standardisation; the reference's 0.015
is in raw feature units). One training per ``--sigmas`` value, its maps read at each of
``--epochs`` (seed 0).

Same features as ``anomaly_padim.py`` (FP32 PyTorch EfficientNet-Lite0 squashed to 224,
stride 16, 3 x 3 mean, cached under ``--work``); the bank is the shipped default build
scored by exact search; every map is smoothed by sigma one cell. The sum adds each map
z-scored by the mean and standard deviation of its good *training* maps (the bank's
leave-one-out maps, the discriminator's in-sample maps): nothing is chosen on the test set,
and every candidate's test figures are printed side by side.

    cd benchmarks && ../.venv/bin/python anomaly_simplenet.py \\
        [--sigmas 0.1,0.25,0.5] [--epochs 10,40]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGE_TL_QUIET", "1")

from anomaly_sweep import beside_bank  # noqa: E402
from magnetic_tile import numbers, print_table, report, zscore  # noqa: E402

from edge_tl.runtime import patchcore as pc  # noqa: E402

STAGES = ("features_s16",)
MARGIN = 0.5  # SimpleNet's truncation threshold for both terms of the loss
HIDDEN = 1024  # the discriminator's hidden width, as the reference
BATCH = 2048  # patches per step


def train(x: np.ndarray, sigma: float, epochs: list[int], grid, seed: int = 0):
    """Train one adaptor + discriminator on good patches ``x`` (``float32[N, P, C]``,
    standardised); yield ``(epoch, score_fn)`` at each checkpoint in ``epochs``, where
    ``score_fn(float32[M, P, C]) -> float32[M, h, w]`` gives smoothed anomaly maps."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    c = x.shape[-1]
    adaptor = torch.nn.Linear(c, c)
    disc = torch.nn.Sequential(
        torch.nn.Linear(c, HIDDEN),
        torch.nn.BatchNorm1d(HIDDEN),
        torch.nn.LeakyReLU(0.2),
        torch.nn.Linear(HIDDEN, 1, bias=False),
    )
    for m in (adaptor, disc[0], disc[3]):
        torch.nn.init.xavier_uniform_(m.weight)
    opt = torch.optim.Adam(
        [
            {"params": adaptor.parameters(), "lr": 1e-4},
            {"params": disc.parameters(), "lr": 2e-4, "weight_decay": 1e-5},
        ]
    )
    flat = torch.from_numpy(x.reshape(-1, c))

    def score(feats: np.ndarray) -> np.ndarray:
        adaptor.eval()
        disc.eval()
        with torch.no_grad():
            q = torch.from_numpy(feats.reshape(-1, c).astype(np.float32))
            s = -disc(adaptor(q)).numpy()
        adaptor.train()
        disc.train()
        return pc.blur(s.reshape(len(feats), *grid).astype(np.float32), 1.0)

    for epoch in range(1, epochs[-1] + 1):
        order = torch.randperm(len(flat))
        for i in range(0, len(flat), BATCH):
            good = adaptor(flat[order[i : i + BATCH]])
            noisy = good + sigma * torch.randn_like(good)
            out = disc(torch.cat([good, noisy]))
            n = len(good)
            loss = (MARGIN - out[:n]).clamp(min=0).mean() + (MARGIN + out[n:]).clamp(min=0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in epochs:
            yield epoch, score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/edge_tl_anomaly_a"))
    p.add_argument("--sigmas", default="0.1,0.25,0.5", help="noise scales, ','-joined")
    p.add_argument("--epochs", default="10,40", help="checkpoints read, ','-joined")
    args = p.parse_args()
    try:
        sigmas = numbers(args.sigmas, float, "--sigmas")
        epochs = numbers(args.epochs, int, "--epochs")
    except ValueError as e:
        p.error(str(e))
    test, grid, state, bank_te, x_tr, x_te = beside_bank(args.work, STAGES)
    bank_z = zscore(bank_te, state.loo_maps)

    rows = [report("bank, raw distance (shipped build)", bank_te, test)]
    for sigma in sigmas:
        t0 = time.perf_counter()
        for epoch, score in train(x_tr, sigma, epochs, grid):
            took = time.perf_counter() - t0
            sn_te, sn_tr = score(x_te), score(x_tr)
            name = f"SimpleNet, sigma {sigma:g}, {epoch} epochs"
            alone = report(f"{name} ({took:.0f} s)", sn_te, test)
            both = report(f"sum: bank + {name}", bank_z + zscore(sn_te, sn_tr), test)
            rows += [alone, both]
            print(
                f"  {alone['map']}: pixel AUROC {alone['pixel_auroc']:.4f}, "
                f"sum {both['pixel_auroc']:.4f}",
                flush=True,
            )
    print(
        f"features {'+'.join(STAGES)} pool {state.pool}, grid {grid[0]}x{grid[1]}, "
        f"{x_tr.shape[-1]} channels, {x_tr.shape[0] * x_tr.shape[1]:,} good patches; "
        f"bank {state.bank_mb:.1f} MB"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
