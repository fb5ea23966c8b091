"""Full fine-tuning throughput on a CUDA GPU: plain fp32 vs bf16 + channels_last (+ compile).

Same model, optimiser (AdamW, discriminative groups from ``edge_tl.train``), batch and
real images (NEU-DET, decoded once and kept on the GPU, augmented there) in one run;
images/s after warm-up, and each variant's ratio to the plain fp32 loop. With two or more
GPUs it also times a 2-process DDP run of ``edge-tl train`` under torchrun. Without a GPU
it says so and exits 0.

    python benchmarks/gpu_train.py [--backbones efficientnet_lite0,resnet50] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EDGE_TL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = {
    "fp32": {"bf16": False, "channels_last": False, "compile": False},
    "bf16+channels_last": {"bf16": True, "channels_last": True, "compile": False},
    "bf16+channels_last+compile": {"bf16": True, "channels_last": True, "compile": True},
}


def _images(data: Path, n: int, size: int) -> torch.Tensor:
    from edge_tl.data import image_folder
    from edge_tl.runtime.preprocess import load_image, to_pixels
    from edge_tl.spec import Preprocess

    ds = image_folder(data)
    idx = np.random.default_rng(0).permutation(len(ds))[:n]
    pre = Preprocess(size=size, mean=(0, 0, 0), std=(1, 1, 1))
    px = np.stack([to_pixels(load_image(ds.paths[i]), pre) for i in idx])
    return torch.from_numpy(px), torch.from_numpy(ds.labels[idx]), len(ds.classes)


def _throughput(name: str, variant: dict, pixels, labels, n_classes, batch, steps) -> float:
    from edge_tl.backbones import build
    from edge_tl.train import TrainConfig
    from edge_tl.train.augment import augment, normalise, parse_augment
    from edge_tl.train.loop import ClassifierNet, _param_groups
    from edge_tl.train.policies import make_policy

    dev = torch.device("cuda")
    pretrained = name.startswith("efficientnet")  # torchvision weights need --weights
    features, _ = build(name, pretrained=pretrained)
    policy = make_policy(features, "full")
    model = ClassifierNet(features, None, n_classes, 0.2).to(dev).train()
    fmt = torch.channels_last if variant["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(_param_groups(model, policy, TrainConfig(strategy="full")))
    step_model = torch.compile(model) if variant["compile"] else model
    pre = features.spec.preprocess
    aug = parse_augment("inspection", grey=True)
    gen = torch.Generator().manual_seed(0)
    pixels, labels = pixels.to(dev), labels.to(dev)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(i: int) -> None:
        idx = torch.randint(len(pixels), (batch,), generator=gen).to(dev)
        x = normalise(augment(pixels[idx].float(), aug, gen), pre.mean, pre.std)
        x = x.contiguous(memory_format=fmt)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=variant["bf16"]):
            loss = loss_fn(step_model(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(5 if variant["compile"] else 3):  # warm-up (and compilation)
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def _ddp(data: Path, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            "train",
            str(data),
            "--strategy",
            "full",
            "--epochs",
            "2",
            "--json",
            "--patience",
            "0",
        ]
        out = {}
        for n in (1, nproc):
            launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}"]
            cmd = [*launcher, "-m", "edge_tl.cli", *common, "--out", f"{tmp}/run{n}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"DDP run failed: {r.stderr.strip().splitlines()[-1]}")
            m = json.loads(Path(f"{tmp}/run{n}/metrics.json").read_text())
            out[n] = {"seconds_per_epoch": m["seconds_per_epoch"], "acc": m["test_accuracy"]}
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "neu_det"))
    p.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=512)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the GPU training benchmark needs one; skipped")
        return 0
    gpu = torch.cuda.get_device_name(0)
    pixels, labels, k = _images(Path(args.data), args.images, 224)
    print(f"full fine-tuning at 224x224, batch {args.batch}, {args.steps} timed steps, {gpu}\n")
    print("| backbone | variant | images/s | vs fp32 |")
    print("|---|---|---|---|")
    for name in args.backbones.split(","):
        base = None
        for label, v in VARIANTS.items():
            ips = _throughput(name, v, pixels, labels, k, args.batch, args.steps)
            base = base or ips
            print(f"| {name} | {label} | {ips:.0f} | {ips / base:.2f}x |", flush=True)
    n = torch.cuda.device_count()
    if n >= 2:
        res = _ddp(Path(args.data), 2)
        speed = res[1]["seconds_per_epoch"] / res[2]["seconds_per_epoch"]
        print(
            f"\nDDP (edge-tl train --strategy full, NEU-DET): 1 GPU {res[1]['seconds_per_epoch']}"
            f" s/epoch, 2 GPUs {res[2]['seconds_per_epoch']} s/epoch ({speed:.2f}x)"
        )
    else:
        print(f"\n{n} GPU visible: the 2-process DDP timing needs two; skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
