"""The device side's ``edge-tl`` subcommands (torch-free): ``predict``, ``anomaly``,
``learn``, ``adapt``, ``rollback``, ``evaluate``, ``serve`` and ``bench``. Each checks its
flags, makes one call into :mod:`edge_tl.runtime` (or :mod:`edge_tl.serve`) and prints the
outcome (:mod:`edge_tl.cli.output`); each returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from edge_tl.cli import output
from edge_tl.errors import EdgeTLError, require
from edge_tl.images import SKIPPED

__all__ = ["adapt", "anomaly", "bench", "evaluate", "learn", "predict", "rollback", "serve"]

_logger = logging.getLogger("edge_tl.cli")


def _search(model: Any, search: str | None) -> None:
    """Set how the anomaly bank is searched (``--search``); refused on a bundle without one."""
    if search is None:
        return
    if model.modality == "text" or model.detector.state is None:
        raise EdgeTLError(
            f"--search {search} picks how an anomaly bank is searched; bundle {model.path} "
            f"has none (build one with `edge-tl anomaly {model.path} GOOD_DIR`)"
        )
    model.detector.search = search


def predict(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model

    texts = _texts(args)
    if not texts and not args.images:
        raise EdgeTLError("nothing to predict: give IMAGE files, or --text/--text-file")
    class_threshold = _class_values(args.class_threshold, "--class-threshold")
    model = Model(args.bundle, trust=args.trust)
    if texts and model.modality != "text":
        raise model.wrong_input("--text/--text-file give texts")
    if args.images and model.modality == "text":
        raise model.wrong_input(f"{args.images[0]} was given as an image")
    _search(model, args.search)
    results = model.predict(
        texts or [str(p) for p in args.images],
        top_k=args.top_k,
        task="classify" if args.classify else None,
        maps_dir=args.maps,
        class_threshold=class_threshold,
    )
    if args.json:
        output.print_json([r.to_dict() for r in results])
    else:
        output.predictions(results)
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    """The texts of ``--text`` and ``--text-file`` (in that order), checked before any
    bundle is loaded."""
    from edge_tl.runtime.text import check_texts
    from edge_tl.texts import read_texts

    if args.text_column is not None and args.text_file is None:
        raise EdgeTLError("--text-column names the column of --text-file; give --text-file")
    texts = check_texts(args.text, "--text")
    if args.text_file is not None:
        texts += read_texts(args.text_file, args.text_column or "text")
    if texts and args.images:
        raise EdgeTLError(
            "give IMAGES or --text/--text-file, not both (an image bundle takes images, a "
            "text bundle texts)"
        )
    return texts


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
    summary = Model(args.bundle, trust=args.trust).detector.apply(change).summary()
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
        text_column=args.text_column,
        label_column=args.label_column,
    )
    model = Model(args.bundle, trust=args.trust)
    classifier = _task_classifier(model, args.task)
    before = classifier.state.summary() if classifier.state is not None else None
    state = classifier.apply(change)
    summary = state.summary()
    if args.json:
        output.print_json({"bundle": str(args.bundle), "head": summary, "previous": before})
    else:
        output.head_summary(args.bundle, summary)
    output.skipped(summary.get(SKIPPED))
    return 0


def adapt(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model

    if args.off and (args.target or args.method or args.reg is not None or args.skip_bad):
        raise EdgeTLError(
            "--off turns the alignment off; TARGET, --method, --reg and --skip-bad are for a "
            "new one: drop them"
        )
    if not args.off and not args.target:
        raise EdgeTLError(
            "adapt needs TARGET, a folder of unlabelled images from the new camera or line "
            f"(`edge-tl adapt {args.bundle} TARGET`), or --off to undo an alignment"
        )
    method = args.method or "coral"
    if args.reg is not None and method != "coral":
        raise EdgeTLError("--reg regularises coral's covariances; drop it for --method center")
    if args.reg is not None and not (math.isfinite(args.reg) and args.reg > 0):
        raise EdgeTLError(f"--reg must be a number > 0, not {args.reg}")
    model = Model(args.bundle, trust=args.trust)
    reg = 1.0 if args.reg is None else args.reg
    state = model.adapt(args.target, method, reg, args.skip_bad, off=args.off)
    summary = state.summary()
    if args.json:
        output.print_json({"bundle": str(args.bundle), "head": summary})
    else:
        output.adapted(args.bundle, summary)
    return 0


def _task_classifier(model: Any, task: str | None) -> Any:
    """The head ``learn`` changes: the bundle's, or on a multi-task bundle ``--task``'s.

    Raises:
        EdgeTLError: ``--task`` missing on a multi-task bundle, unknown, or given on a
            one-task bundle.
    """
    if model.tasks:
        if task is None or task not in model.tasks:
            given = "" if task is None else f"{task!r} is not one of them; "
            raise EdgeTLError(
                f"bundle {model.path} has tasks {', '.join(model.tasks)}; {given}pass --task "
                "NAME to learn that task's head"
            )
        return model.tasks[task]
    if task is not None:
        raise EdgeTLError(f"bundle {model.path} has one task; drop --task")
    return model.classifier


def rollback(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.runtime.anomaly import bank_store
    from edge_tl.runtime.learner import head_store

    if args.list and args.to is not None:
        raise EdgeTLError("--list shows the versions and changes nothing; drop --to, or --list")
    manifest = read_manifest(args.bundle, verify=True, trust=args.trust)
    names = [t.name for t in manifest.tasks or []]
    if args.task is not None and args.task not in names:
        raise EdgeTLError(
            f"--task {args.task!r} is not a task of {args.bundle} "
            f"({', '.join(names) if names else 'it has one task: drop --task'})"
        )
    if args.task is not None and args.anomaly:
        raise EdgeTLError("--task picks a head; --anomaly the anomaly bank: give one")
    if args.anomaly:
        store = bank_store(args.bundle, manifest)
    else:
        store = head_store(args.bundle, manifest, args.task)
    if args.list:
        versions = store.history()
        if args.json:
            output.print_json(versions)
        else:
            output.history(args.bundle, versions, args.anomaly)
            try:
                store.current()
            except EdgeTLError as e:  # listed all the same: this is how to find the way back
                print(f"  no version is current: {e}")
        return 0
    summary = store.rollback(args.to).summary()
    if args.json:
        output.print_json(summary)
    else:
        output.rolled_back(args.bundle, summary, args.anomaly)
    return 0


def serve(args: argparse.Namespace) -> int:
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from edge_tl.serve import ServeConfig, run

    config = ServeConfig(
        bundles=list(args.bundles),
        names=list(args.name),
        token_file=args.token_file,
        token_for_infer=args.token_for_infer,
        max_body_mb=args.max_body_mb,
        max_pixels=args.max_pixels,
        trust=args.trust,
    )
    run(config, args.host, args.port, args.workers, args.ssl_certfile, args.ssl_keyfile)
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
        trust=args.trust,
    )
    if args.json:
        output.print_json(res)
    else:
        output.bench(args.bundle, res, args.profile and res["profile"]["name"])
    failed = [k for k, b in res.get("budgets", {}).items() if not b["holds"]]
    return 3 if args.check and failed else 0


def _class_values(specs: list[str], flag: str) -> dict[str, float]:
    """``--min-recall`` / ``--class-threshold`` items as ``{CLASS: value}``, checked before
    any bundle is opened."""
    from edge_tl.runtime.operating import parse_class_values

    if flag == "--min-recall":
        return parse_class_values(specs, flag, "the recall asked for", True, "CLASS=R")
    return parse_class_values(specs, flag, "a probability threshold", False, "CLASS=T")


def evaluate(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model

    min_recall = _class_values(args.min_recall, "--min-recall")
    class_threshold = _class_values(args.class_threshold, "--class-threshold")
    model = Model(args.bundle, trust=args.trust)
    data = args.data
    if args.tasks is not None:  # DATA's labels for these tasks (a multi-label source)
        from edge_tl.data import open_dataset
        from edge_tl.multitask import parse_tasks

        data = open_dataset(args.data, args.skip_bad, tasks=parse_tasks(args.tasks))
    _search(model, args.search)
    res = model.evaluate(
        data,
        split=args.split,
        maps_dir=args.maps,
        skip_bad=args.skip_bad,
        text_column=args.text_column,
        label_column=args.label_column,
        min_recall=min_recall,
        class_threshold=class_threshold,
    )
    if args.json:
        output.print_json(res.to_dict())
    else:
        output.evaluation(res, unit=model.modality)
    if min_recall and args.split == "test":
        print(
            "edge-tl: note: --min-recall chose its threshold on the test split, so the test "
            "figures at it are optimistic; choose it with --split val and check it here "
            "with --class-threshold CLASS=T",
            file=sys.stderr,
        )
    output.skipped(res.skipped)
    return 0
