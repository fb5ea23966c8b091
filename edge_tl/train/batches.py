"""What the training loop reads: cached boundary activations, or images decoded by
DataLoader workers and augmented on the training device.

When everything before the first trainable block is frozen (and not QAT), that block's
inputs are computed once per image (and per augmented view, ``views > 1``) through the
exported prefix (:mod:`edge_tl.train.cache`), and an epoch reads them from memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from edge_tl.progress import progress
from edge_tl.runtime.preprocess import load_image, to_pixels
from edge_tl.train.augment import Augment, augment, normalise
from edge_tl.train.cache import PrefixRunner
from edge_tl.train.config import TrainConfig
from edge_tl.train.policies import Policy

__all__ = ["ImageDataset", "TrainingData"]


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, resized pixels ``uint8[3, S, S]`` (augmentation happens on the device)."""

    def __init__(self, paths: list[str], pre) -> None:
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(to_pixels(load_image(self.paths[i]), self.pre))


class TrainingData:
    """Training batches and evaluation inputs, from a cache or from images."""

    def __init__(
        self,
        features,
        ds,
        splits,
        config: TrainConfig,
        policy: Policy,
        device,
        aug: Augment,
        unlabeled: dict[str, list[str]] | None = None,
    ) -> None:
        """``unlabeled``: more images by name (domain adaptation's target), cached like the
        evaluation splits (no augmentation) and read with :meth:`inputs_of`."""
        self.pre = features.spec.preprocess
        self.config, self.device, self.aug = config, device, aug
        self.paths = {k: [ds.paths[i] for i in v] for k, v in splits.items()}
        self.paths.update(unlabeled or {})
        self.y = {k: ds.labels[v] for k, v in splits.items()}
        # QAT runs the frozen layers too, so their INT8 rounding reaches the trained ones
        self.cached = config.cache and policy.boundary is not None and not config.qat
        self.acts: dict[str, np.ndarray] = {}
        t0 = time.perf_counter()
        if self.cached:
            self._cache(features, policy.boundary)
        self.cache_seconds = round(time.perf_counter() - t0, 1)

    def _cache(self, features, block: int) -> None:
        cfg, pre = self.config, self.pre
        gen = torch.Generator().manual_seed(cfg.seed + 7919)
        views = []
        with PrefixRunner(features, pre.size, block, cfg.onnx_cache) as run:  # exported once
            for v in range(cfg.views):
                desc = f"caching block {block} input" + (
                    f" (view {v + 1}/{cfg.views})" if cfg.views > 1 else ""
                )
                keys = ("train",) if v else tuple(self.paths)
                for k in keys:
                    acts = run(self._input_batches(self.paths[k], gen if v else None, desc))
                    if k == "train":
                        views.append(acts)
                    else:
                        self.acts[k] = acts
        self.acts["train"] = np.stack(views)  # [views, n, ...]

    def _input_batches(self, paths, gen, desc) -> Iterator[np.ndarray]:
        loader = self._loader(paths, None)
        for px in progress(loader, desc=desc):
            x = px.float()  # a new tensor (and augment returns another): normalised in place
            if gen is not None:
                x = augment(x, self.aug, gen)
            yield normalise(x, self.pre.mean, self.pre.std, inplace=True).numpy()

    def _loader(self, paths, batches) -> torch.utils.data.DataLoader:
        cfg = self.config
        kw: dict[str, Any] = {"num_workers": cfg.workers, "pin_memory": self.device.type == "cuda"}
        if cfg.workers:
            kw["prefetch_factor"] = 4
            # workers start from a clean server process, not a fork of this one: by now the
            # process runs ONNX Runtime / OpenVINO thread pools, and forking a threaded
            # process can crash it (seen as segfaults in long test sessions)
            if "forkserver" in torch.multiprocessing.get_all_start_methods():
                # the server imports torch and this module once; workers fork from it cheaply
                torch.multiprocessing.set_forkserver_preload(["edge_tl.train.batches"])
                kw["multiprocessing_context"] = "forkserver"
        if batches is None:
            return torch.utils.data.DataLoader(ImageDataset(paths, self.pre), batch_size=64, **kw)
        return torch.utils.data.DataLoader(
            ImageDataset(paths, self.pre), batch_sampler=batches, **kw
        )

    def epoch(
        self, batches: list[np.ndarray], gen: torch.Generator, rank: int = 0, world: int = 1
    ) -> Iterator[tuple]:
        """``(x, y)`` on the device: this process's slice ``[rank::world]`` of each batch.

        Random draws (views, augmentation) are made per global batch from a seed drawn from
        ``gen``, so they do not depend on the number of processes.
        """
        y = torch.from_numpy(self.y["train"])
        local = [idx[rank::world] for idx in batches]
        seeds = [int(torch.randint(2**62, (1,), generator=gen)) for _ in batches]
        rows = slice(rank, None, world)
        if self.cached:
            acts = self.acts["train"]
            for idx, part, seed in zip(batches, local, seeds, strict=True):
                g = torch.Generator().manual_seed(seed)
                v = torch.randint(acts.shape[0], (len(idx),), generator=g).numpy()[rows]
                x = torch.from_numpy(acts[v, part]).to(self.device)
                yield self._prepare(x), y[part].to(self.device)
            return
        loader = self._loader(self.paths["train"], local)
        for idx, part, seed, px in zip(batches, local, seeds, loader, strict=True):
            g = torch.Generator().manual_seed(seed)
            x = augment(px.to(self.device, non_blocking=True).float(), self.aug, g, rows, len(idx))
            x = normalise(x, self.pre.mean, self.pre.std, inplace=True)
            yield self._prepare(x), y[part].to(self.device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def inputs_of(self, key: str, batches: list[np.ndarray]) -> Iterator[torch.Tensor]:
        """Network inputs (no augmentation, no labels) of index batches into ``key``'s images."""
        if self.cached:
            a = self.acts[key]
            for idx in batches:
                yield self._prepare(torch.from_numpy(a[idx]).to(self.device))
            return
        for px in self._loader(self.paths[key], batches):
            x = normalise(
                px.to(self.device, non_blocking=True).float(), self.pre.mean, self.pre.std
            )
            yield self._prepare(x)

    def eval_batches(self, split: str) -> Iterator[torch.Tensor]:
        if self.cached:
            a = self.acts[split]
            for i in range(0, len(a), 128):
                yield self._prepare(torch.from_numpy(a[i : i + 128]).to(self.device))
            return
        for px in self._loader(self.paths[split], None):
            x = normalise(px.to(self.device).float(), self.pre.mean, self.pre.std)
            yield self._prepare(x)
