"""One function per ``edge-tl`` subcommand: parsed flags in, one library call, output out.

Each returns the exit code. Decisions (which face answers, which split, what a change
means) are the library's; printing is :mod:`edge_tl.cli.output`.
"""

from __future__ import annotations

import argparse
import logging
import os

from edge_tl.cli import output
from edge_tl.cli.training_flags import train_config
from edge_tl.errors import EdgeTLError, require
from edge_tl.images import SKIPPED

__all__ = [
    "anomaly",
    "bench",
    "compare",
    "demo",
    "evaluate",
    "export",
    "inspect",
    "learn",
    "predict",
    "rollback",
    "train",
    "verify",
]

_logger = logging.getLogger("edge_tl.cli")


def _workstation() -> None:
    """Training and export need torch: say so in one line on a device-only install."""
    require("torch", "train")


def train(args: argparse.Namespace) -> int:
    _workstation()
    from edge_tl.train import train as train_run

    cfg = train_config(args, args.strategy)
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
        print(
            f"trained {cfg.strategy} on {args.data}: test accuracy "
            f"{metrics['test_accuracy']:.4f} (n={metrics['n_test']}) -> {args.out}"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        output.skipped(metrics.get(SKIPPED))
    return 0


def compare(args: argparse.Namespace) -> int:
    _workstation()
    from edge_tl.train.compare import compare as compare_runs
    from edge_tl.train.compare import markdown, parse_strategies

    strategies = parse_strategies(args.strategies)
    result = compare_runs(
        args.data,
        args.out,
        strategies,
        train_config(args, strategies[0]),
        threshold=args.threshold / 100,
        force=args.force,
        resume=args.resume,
    )
    if args.json:
        output.print_json(result)
    else:
        print(markdown(result))
        print(f"table, curves and runs -> {args.out}")
    return 0


def export(args: argparse.Namespace) -> int:
    _workstation()
    from edge_tl.export import export_bundle
    from edge_tl.export.pipeline import CALIBRATION_SKIPPED

    m = export_bundle(
        args.out,
        args.recipe,
        run=args.run,
        backbone=args.backbone,
        calib=args.calib,
        head_fit=args.head_fit,
        force=args.force,
        weights=args.weights,
        logits=args.logits,
        skip_bad=args.skip_bad,
    )
    if args.json:
        output.print_json(m.metrics)
    else:
        output.export(m, args.out)
    output.skipped(m.metrics.get(CALIBRATION_SKIPPED))
    return 0


def predict(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model

    results = Model(args.bundle).predict(
        [str(p) for p in args.images],
        top_k=args.top_k,
        task="classify" if args.classify else None,
        maps_dir=args.maps,
    )
    if args.json:
        output.print_json([r.to_dict() for r in results])
    else:
        output.predictions(results)
    return 0


def anomaly(args: argparse.Namespace) -> int:
    from edge_tl.runtime import BankChange, Model

    change = BankChange(
        good=args.good,
        add=args.add,
        coreset=args.coreset,
        max_mb=args.max_mb,
        false_alarm=args.false_alarm,
        stages=None
        if args.stages is None
        else tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        pool=args.pool,
        skip_bad=args.skip_bad,
    )
    summary = Model(args.bundle).detector.apply(change).summary()
    if args.json:
        output.print_json(summary)
    else:
        output.bank_summary(args.bundle, summary)
    output.skipped(summary.get(SKIPPED))
    return 0


def learn(args: argparse.Namespace) -> int:
    from edge_tl.runtime import HeadChange, Model

    change = HeadChange(
        data=args.data,
        add=args.add,
        remove=args.remove,
        relabel=args.relabel,
        import_path=args.import_,
        head=args.head,
        k=args.k,
        quantile=args.quantile,
        threshold=args.threshold,
        open_set=not args.no_open_set,
        skip_bad=args.skip_bad,
    )
    classifier = Model(args.bundle).classifier
    before = classifier.state.summary() if classifier.state is not None else None
    state = classifier.apply(change)
    summary = state.summary()
    if args.json:
        output.print_json({"bundle": str(args.bundle), "head": summary, "previous": before})
    else:
        hint = summary["threshold"] is None and change.open_set and not state.open_set_ready
        output.head_summary(args.bundle, summary, hint)
    output.skipped(summary.get(SKIPPED))
    return 0


def rollback(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.runtime.anomaly import bank_store
    from edge_tl.runtime.learner import head_store

    if args.list and args.to is not None:
        raise EdgeTLError("--list shows the versions and changes nothing; drop --to, or --list")
    manifest = read_manifest(args.bundle, verify=True)
    store = (bank_store if args.anomaly else head_store)(args.bundle, manifest)
    if args.list:
        versions = store.history()
        if args.json:
            output.print_json(versions)
        else:
            output.history(args.bundle, versions, args.anomaly)
        return 0
    summary = store.rollback(args.to).summary()
    if args.json:
        output.print_json(summary)
    else:
        output.rolled_back(args.bundle, summary, args.anomaly)
    return 0


def bench(args: argparse.Namespace) -> int:
    from edge_tl.runtime.bench import bench as bench_bundle
    from edge_tl.spec import load_profile

    if args.device_alias:
        if args.profile:
            raise EdgeTLError("--device is the old name of --profile; give only --profile")
        _logger.warning("--device is now --profile (device profile); it still works for now")
        args.profile = args.device_alias
    res = bench_bundle(
        args.bundle,
        load_profile(args.profile) if args.profile else None,
        args.images,
        args.repeats,
        args.batch,
    )
    if args.json:
        output.print_json(res)
    else:
        output.bench(args.bundle, res, args.profile and res["profile"]["name"])
    failed = [k for k, b in res.get("budgets", {}).items() if not b["holds"]]
    return 3 if args.check and failed else 0


def evaluate(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model

    res = Model(args.bundle).evaluate(
        args.data, split=args.split, maps_dir=args.maps, skip_bad=args.skip_bad
    )
    if args.json:
        output.print_json(res.to_dict())
    else:
        output.evaluation(res)
    output.skipped(res.skipped)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.report import read_report
    from edge_tl.runtime.anomaly import bank_store
    from edge_tl.runtime.learner import head_store

    m = read_manifest(args.bundle, verify=True)
    report = read_report(args.bundle)
    heads = head_store(args.bundle, m).history()
    banks = bank_store(args.bundle, m).history()
    if args.json:
        output.print_json(
            {
                **m.to_dict(),
                "hashes_verified": True,
                "fidelity": report.to_dict() if report is not None else None,
                "learned_heads": heads,
                "anomaly_banks": banks,
            }
        )
    else:
        output.inspect(args.bundle, m, report, heads, banks)
    return 0


def verify(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model
    from edge_tl.runtime.selftest import enforce

    model = Model(args.bundle, self_test=False)  # hashes checked; the current head read
    result = model.check_self_test()
    model.detector.state  # noqa: B018 - a damaged bank fails here, not at the next predict
    if args.json:
        output.print_json(
            {"bundle": str(args.bundle), "hashes_verified": True, "self_test": result}
        )
    else:
        output.verify(args.bundle, result)
    enforce(model.path, result)
    return 0


def demo(args: argparse.Namespace) -> int:
    _workstation()
    from edge_tl.demo import run_demo

    run_demo(
        args.out,
        strategy=args.strategy,
        epochs=args.epochs,
        train_stages=args.train_stages,
        data=args.data,
        recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()),
    )
    return 0
