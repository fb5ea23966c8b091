"""The workstation's ``edge-tl`` subcommands: ``train``, ``compare``, ``select``, ``export``
and ``demo``. Each checks that torch is installed (one line on a device-only install),
makes one library call and prints the outcome (:mod:`edge_tl.cli.output`); each returns
the exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from edge_tl.cli import output
from edge_tl.cli.commands_bundle import bundle_signature
from edge_tl.cli.training_flags import is_text_training, text_train_config, train_config
from edge_tl.errors import EdgeTLError, require
from edge_tl.images import SKIPPED
from edge_tl.spec import DEFAULT_STRATEGY, TEXT_DEFAULT_STRATEGY

__all__ = ["compare", "demo", "export", "select", "train"]


def _workstation() -> None:
    """Training and export need torch: say so in one line on a device-only install."""
    require("torch", "train")


def train(args: argparse.Namespace) -> int:
    _workstation()
    if is_text_training(args):
        adapting = [f for f in ("target_unlabeled", "adapt", "adapt_weight") if getattr(args, f)]
        if adapting:
            flag = "--" + adapting[0].replace("_", "-")
            raise EdgeTLError(f"{flag} (domain adaptation) is for image data; drop it for text")
        return _train_text(args)
    from edge_tl.train import train as train_run

    cfg = train_config(args, args.strategy or DEFAULT_STRATEGY)
    if (cfg.stages or cfg.params) and cfg.strategy != "selective":
        raise EdgeTLError(
            f"--stages and --params choose what --strategy selective trains; {cfg.strategy} "
            "decides that itself (drop them, or use --strategy selective)"
        )
    metrics = train_run(
        args.data, args.out, cfg, force=args.force, resume=args.resume, skip_bad=args.skip_bad
    )
    if args.json:
        output.print_json(metrics)
    elif int(os.environ.get("RANK", "0")) == 0:
        if "chosen" in metrics:  # auto: what it chose and why, in one line
            print(f"auto chose {metrics['why']}")
        name = f"auto ({metrics['chosen']})" if "chosen" in metrics else cfg.strategy
        print(
            f"trained {name} on {args.data}: test accuracy "
            f"{metrics['test_accuracy']:.4f} (n={metrics['n_test']}) -> {args.out}"
        )
        if "target_test_accuracy" in metrics:
            print(
                f"adapted to {args.target_unlabeled} ({cfg.adapt}): target test accuracy "
                f"{metrics['target_test_accuracy']:.4f} (n={metrics['n_target_test']}); "
                f"source/target embeddings -> {args.out}/domains.png"
            )
        for task, m in metrics.get("tasks", {}).items():
            print(f"  task {task}: test accuracy {m['test_accuracy']:.4f}")
    if int(os.environ.get("RANK", "0")) == 0:
        output.skipped(metrics.get(SKIPPED))
    return 0


def _train_text(args: argparse.Namespace) -> int:
    require("transformers", "nlp")
    from edge_tl.train.text import train_text

    cfg = text_train_config(args, args.strategy or TEXT_DEFAULT_STRATEGY)
    metrics = train_text(
        args.data, args.out, cfg, force=args.force, resume=args.resume, skip_bad=args.skip_bad
    )
    if args.json:
        output.print_json(metrics)
    else:
        tested = cfg.test_data or "the test split"
        print(
            f"trained {cfg.strategy} on {args.data}: test accuracy "
            f"{metrics['test_accuracy']:.4f} on {tested} (n={metrics['n_test']}) -> {args.out}"
        )
    output.skipped(metrics.get(SKIPPED))
    return 0


def compare(args: argparse.Namespace) -> int:
    _workstation()
    from edge_tl.train.compare import (
        DEFAULT_STRATEGIES,
        TEXT_DEFAULT_STRATEGIES,
        markdown,
        parse_strategies,
    )
    from edge_tl.train.compare import compare as compare_runs

    text = is_text_training(args)
    if text:
        require("transformers", "nlp")
        if args.select:
            raise EdgeTLError("--select ranks image backbones; drop it on text data")
    default = TEXT_DEFAULT_STRATEGIES if text else DEFAULT_STRATEGIES
    strategies = parse_strategies(args.strategies or default, text)
    make_config = text_train_config if text else train_config
    result = compare_runs(
        args.data,
        args.out,
        strategies,
        make_config(args, strategies[0]),
        threshold=args.threshold / 100,
        force=args.force,
        resume=args.resume,
        select=args.select,
    )
    if args.json:
        output.print_json(result)
    else:
        print(markdown(result))
        print(f"table, curves and runs -> {args.out}")
    return 0


def select(args: argparse.Namespace) -> int:
    _workstation()
    from edge_tl.train.select import markdown, parse_backbones
    from edge_tl.train.select import select as select_backbones

    sel = select_backbones(
        args.data,
        parse_backbones(args.backbones),
        out=args.out,
        results=args.results,
        per_class=args.per_class,
        seed=args.seed,
        baseline=not args.no_baseline,
        force=args.force,
        use_onnx=not args.no_onnx_cache,
    )
    if args.json:
        output.print_json(sel.to_dict())
    else:
        print(markdown(sel))
        if args.out is not None:
            print(f"table and scores -> {args.out}")
    return 0


def export(args: argparse.Namespace) -> int:
    from edge_tl.signing import load_private_key

    key = load_private_key(args.sign) if args.sign else None  # a bad key fails before the work
    _workstation()
    from edge_tl.export import export_bundle
    from edge_tl.export.pipeline import CALIBRATION_SKIPPED

    if "," in args.recipe:  # several bundles, one per recipe, sharing their work
        return _export_many(args, key)
    m = export_bundle(
        args.out, args.recipe, run=args.run, backbone=args.backbone, **_export_options(args, key)
    )
    if args.json:
        output.print_json(m.metrics)
    else:
        output.export(m, args.out)
        if key is not None:
            output.signed(args.out, bundle_signature(args.out, None))
    output.skipped(m.metrics.get(CALIBRATION_SKIPPED))
    return 0


def _export_options(args: argparse.Namespace, key: Any) -> dict[str, Any]:
    """The image export's keyword options from ``edge-tl export``'s flags (one bundle or
    several: the same options)."""
    return {
        "calib": args.calib,
        "head_fit": args.head_fit or ("source" if args.adapt_bn else "artifact"),
        "force": args.force,
        "weights": args.weights,
        "logits": args.logits,
        "sign": key,
        "skip_bad": args.skip_bad,
        "adapt_bn": args.adapt_bn,
        "cache": not args.no_cache,
        "image_size": args.image_size or 0,
    }


def _export_many(args: argparse.Namespace, key: Any) -> int:
    """``--recipe a,b,c``: one bundle per recipe under ``--out``; exit 1 when accuracy
    control refused any (the others are written)."""
    from edge_tl.export import iter_bundles
    from edge_tl.export.pipeline import CALIBRATION_SKIPPED

    results = {}
    for r in iter_bundles(
        args.out, args.recipe, args.run, args.backbone, **_export_options(args, key)
    ):
        results[r.recipe] = r
        if args.json:
            continue
        if r.manifest is None:
            print(f"refused {r.recipe}: {r.refused}")
            continue
        output.export(r.manifest, r.out)
        if key is not None:
            output.signed(r.out, bundle_signature(r.out, None))
    if args.json:
        output.print_json(
            {
                name: {"refused": str(r.refused)} if r.manifest is None else r.manifest.metrics
                for name, r in results.items()
            }
        )
    first = next((r.manifest for r in results.values() if r.manifest is not None), None)
    if first is not None:
        output.skipped(first.metrics.get(CALIBRATION_SKIPPED))
    refused = [n for n, r in results.items() if r.manifest is None]
    if refused:
        print(
            f"edge-tl: {len(refused)} of {len(results)} recipes refused by accuracy control "
            f"({', '.join(refused)}); the other bundles are written",
            file=sys.stderr,
        )
        return 1
    return 0


def demo(args: argparse.Namespace) -> int:
    _workstation()
    given = None if args.recipes is None else args.recipes.split(",")
    recipes = None if given is None else tuple(r.strip() for r in given if r.strip())
    if args.text:
        from edge_tl.demo_text import TEXT_RECIPES, run_text_demo

        if args.data != "elpv" or args.strategy != "finetune":
            raise EdgeTLError("--data and --strategy are for the image demo; drop them with --text")
        run_text_demo(
            args.out or Path("demo-output-text"),
            epochs=args.epochs or 3,
            recipes=TEXT_RECIPES if recipes is None else recipes,
        )
        return 0
    from edge_tl.demo import RECIPES, run_demo

    run_demo(
        args.out or Path("demo-output"),
        strategy=args.strategy,
        epochs=args.epochs or 6,
        train_stages=args.train_stages,
        data=args.data,
        recipes=RECIPES if recipes is None else recipes,
    )
    return 0
