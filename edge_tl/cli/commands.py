"""One function per ``edge-tl`` subcommand: parsed flags in, one library call, output out.

Each returns the exit code. Decisions (which face answers, which split, what a change
means) are the library's; printing is :mod:`edge_tl.cli.output`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_tl.cli import output
from edge_tl.cli.training_flags import is_text_training, text_train_config, train_config
from edge_tl.errors import EdgeTLError, require
from edge_tl.images import SKIPPED
from edge_tl.spec import DEFAULT_STRATEGY, TEXT_DEFAULT_STRATEGY

__all__ = [
    "anomaly",
    "bench",
    "bundle_from_archive",
    "compare",
    "demo",
    "evaluate",
    "export",
    "inspect",
    "keygen",
    "learn",
    "pack",
    "predict",
    "rollback",
    "select",
    "serve",
    "sign",
    "train",
    "unpack",
    "verify",
]

WRITES_INTO_BUNDLE = ("learn", "anomaly", "rollback", "sign", "adapt")

_logger = logging.getLogger("edge_tl.cli")


def _workstation() -> None:
    """Training and export need torch: say so in one line on a device-only install."""
    require("torch", "train")


@contextlib.contextmanager
def bundle_from_archive(args: argparse.Namespace) -> Iterator[None]:
    """When ``args.bundle`` is an archive (``edge-tl pack``): for a command that only reads,
    unpack it into a temporary folder for the command's duration; refuse one that writes
    into the bundle before any work."""
    from edge_tl.archive import is_archive, open_bundle

    path = getattr(args, "bundle", None)
    if path is None or not is_archive(path):
        yield
        return
    listing = args.command == "rollback" and args.list
    if args.command in WRITES_INTO_BUNDLE and not listing:
        raise EdgeTLError(
            f"{path} is an archive, and {args.command} writes into the bundle; unpack it with "
            f"`edge-tl unpack {path} DIR` and run `edge-tl {args.command}` on DIR"
            + (" (then `edge-tl pack DIR` again)" if args.command == "sign" else "")
        )
    unpacked, args.bundle = open_bundle(path)
    with unpacked:
        yield


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
        args.out,
        args.recipe,
        run=args.run,
        backbone=args.backbone,
        calib=args.calib,
        head_fit=args.head_fit or ("source" if args.adapt_bn else "artifact"),
        force=args.force,
        weights=args.weights,
        logits=args.logits,
        sign=key,
        skip_bad=args.skip_bad,
        adapt_bn=args.adapt_bn,
        cache=not args.no_cache,
        image_size=args.image_size or 0,
    )
    if args.json:
        output.print_json(m.metrics)
    else:
        output.export(m, args.out)
        if key is not None:
            output.signed(args.out, _signature(args.out, None))
    output.skipped(m.metrics.get(CALIBRATION_SKIPPED))
    return 0


def _export_many(args: argparse.Namespace, key: Any) -> int:
    """``--recipe a,b,c``: one bundle per recipe under ``--out``; exit 1 when accuracy
    control refused any (the others are written)."""
    from edge_tl.export import iter_bundles
    from edge_tl.export.pipeline import CALIBRATION_SKIPPED

    results = {}
    for r in iter_bundles(
        args.out,
        args.recipe,
        args.run,
        args.backbone,
        calib=args.calib,
        head_fit=args.head_fit or ("source" if args.adapt_bn else "artifact"),
        force=args.force,
        weights=args.weights,
        logits=args.logits,
        sign=key,
        skip_bad=args.skip_bad,
        adapt_bn=args.adapt_bn,
        cache=not args.no_cache,
        image_size=args.image_size or 0,
    ):
        results[r.recipe] = r
        if args.json:
            continue
        if r.manifest is None:
            print(f"refused {r.recipe}: {r.refused}")
            continue
        output.export(r.manifest, r.out)
        if key is not None:
            output.signed(r.out, _signature(r.out, None))
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


def inspect(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.report import read_report
    from edge_tl.runtime.anomaly import bank_store
    from edge_tl.runtime.learner import head_store

    m = read_manifest(args.bundle, verify=True, trust=args.trust)
    signature = _signature(args.bundle, args.trust)
    report = read_report(args.bundle)
    heads = head_store(args.bundle, m).history()
    banks = bank_store(args.bundle, m).history()
    if args.json:
        output.print_json(
            {
                **m.to_dict(),
                "hashes_verified": True,
                "signature": signature,
                "fidelity": report.to_dict() if report is not None else None,
                "learned_heads": heads,
                "anomaly_banks": banks,
            }
        )
    else:
        output.inspect(args.bundle, m, report, heads, banks, signature)
    return 0


def verify(args: argparse.Namespace) -> int:
    from edge_tl.runtime import Model
    from edge_tl.runtime.selftest import enforce

    # hashes (and with trusted keys the signature) checked; the current head read
    model = Model(args.bundle, self_test=False, trust=args.trust)
    signature = _signature(args.bundle, args.trust)
    result = model.check_self_test()
    model.detector.state  # noqa: B018 - a damaged bank fails here, not at the next predict
    if args.json:
        output.print_json(
            {
                "bundle": str(args.bundle),
                "hashes_verified": True,
                "signature": signature,
                "self_test": result,
            }
        )
    else:
        output.verify(args.bundle, result, signature)
    enforce(model.path, result)
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


def _signature(bundle, trust) -> dict:
    from edge_tl.signing import signature_status, trusted_keys

    return signature_status(bundle, trusted_keys(trust))


def keygen(args: argparse.Namespace) -> int:
    from edge_tl.signing import generate_keys

    base = args.name.with_suffix("") if args.name.suffix in (".key", ".pub") else args.name
    kid = generate_keys(base, force=args.force)
    if args.json:
        output.print_json(
            {"key_id": kid, "private_key": f"{base}.key", "public_key": f"{base}.pub"}
        )
    else:
        print(
            f"key {kid}: private {base}.key (mode 0600; keep it on the signing host), "
            f"public {base}.pub (copy it to devices: --trust {base}.pub)"
        )
    return 0


def sign(args: argparse.Namespace) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.signing import load_private_key, sign_bundle

    key = load_private_key(args.key)
    read_manifest(args.bundle, verify=True, trust=[])  # vouch only for intact files
    sig = sign_bundle(args.bundle, key)
    status = {"signed": True, "key_id": sig.key_id, "signed_at": sig.signed_at}
    if args.json:
        output.print_json({"bundle": str(args.bundle), **status})
    else:
        output.signed(args.bundle, status)
    return 0


def pack(args: argparse.Namespace) -> int:
    from edge_tl.archive import pack as pack_bundle
    from edge_tl.bundle import sha256

    out = pack_bundle(args.bundle, args.out, force=args.force)
    info = {"archive": str(out), "bytes": out.stat().st_size, "sha256": sha256(out)}
    if args.json:
        output.print_json({"bundle": str(args.bundle), **info})
    else:
        print(
            f"packed {args.bundle} -> {out} ({info['bytes'] / 1e6:.1f} MB, sha256 "
            f"{info['sha256'][:16]}); every command that takes a bundle takes {out.name}"
        )
    return 0


def unpack(args: argparse.Namespace) -> int:
    from edge_tl.archive import bundle_in
    from edge_tl.archive import unpack as unpack_archive
    from edge_tl.bundle import read_manifest

    out = unpack_archive(args.archive, args.out)
    try:
        bundle = bundle_in(out, args.archive)
        read_manifest(bundle, verify=True, trust=args.trust)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-right is left behind
        raise
    signature = _signature(bundle, args.trust)
    if args.json:
        output.print_json(
            {"archive": str(args.archive), "bundle": str(bundle), "signature": signature}
        )
    else:
        print(f"unpacked {args.archive} -> {bundle} (hashes verified)")
        print(f"  {output.signature_line(signature)}")
    return 0
