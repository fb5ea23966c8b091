"""``edge-tl``: each subcommand is a thin call into the library.

Bad input ends in one line ``edge-tl: error: <problem>; <fix>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_tl import __version__
from edge_tl.errors import EdgeTLError
from edge_tl.spec import STRATEGIES

if TYPE_CHECKING:
    from edge_tl.train import TrainConfig


EPILOG = "Docs and examples: README.md. Every command exits 2 with a one-line error on bad input."


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeTLError as e:
        print(f"edge-tl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `edge-tl inspect B | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # permissions, full disk: one line, not a traceback
        print(f"edge-tl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-tl: interrupted; {_kept_after_interrupt(args)}", file=sys.stderr)
        return 130


def _kept_after_interrupt(args: argparse.Namespace) -> str:
    out = getattr(args, "out", None)
    if args.command == "train" and out is not None:
        from edge_tl.train.core import checkpoint_path

        ckpt = checkpoint_path(out)
        if ckpt.is_file():
            return f"finished epochs are saved in {ckpt}; rerun with --resume to continue"
    if args.command == "compare" and out is not None:
        from edge_tl.train.compare import partial_path

        work = partial_path(out)
        if work.is_dir():
            return f"finished strategies are kept in {work}; rerun with --resume to continue"
    return "nothing was written"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-tl",
        description="Transfer learning that ends on a device: train on a workstation, export "
        "to ONNX Runtime / OpenVINO (FP32 or INT8), run and evaluate without PyTorch.",
        epilog=EPILOG,
    )
    p.add_argument("--version", action="version", version=f"edge_tl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a classifier on an ImageFolder (or 'elpv') and write a run folder",
        description="Train on DATA (an ImageFolder <class>/<image>, or 'elpv' for the ELPV "
        "solar-cell package) with a transfer strategy: linear-probe, finetune (default: the "
        "last --train-stages stages + head), full, selective, bn-only, bias-only, gradual, "
        "from-scratch. When everything before the first trainable block is frozen, its "
        "activations are computed once and cached. Interrupted runs continue with --resume. "
        "Under torchrun (torchrun --nproc-per-node N -m edge_tl.cli train ...) it trains "
        "with DistributedDataParallel.",
    )
    t.add_argument("data", help="ImageFolder path, or 'elpv'")
    t.add_argument("--out", required=True, type=Path, help="run folder to create")
    _training_args(t)
    t.add_argument("--strategy", default="finetune", help=f"one of {', '.join(STRATEGIES)}")
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint.pt"
    )
    t.add_argument("--json", action="store_true", help="print the metrics as JSON")
    t.set_defaults(func=_train)

    c = sub.add_parser(
        "compare",
        help="train several strategies on the same splits; table, curves, negative transfer",
        description="Train each of --strategies on DATA with the same splits and settings, "
        "each in its own process; print and save a table (accuracy, macro-F1, train time, "
        "trainable parameters, peak memory) and the learning curves, and flag negative "
        "transfer (from-scratch as good as a transfer strategy, or transfer gaining less "
        "than --threshold).",
    )
    c.add_argument("data", help="ImageFolder path, or 'elpv'")
    c.add_argument(
        "--strategies",
        default="linear-probe,finetune,full,bn-only,from-scratch",
        help="comma-separated (default linear-probe,finetune,full,bn-only,from-scratch)",
    )
    c.add_argument("--out", required=True, type=Path, help="comparison folder to create")
    _training_args(c)
    c.add_argument(
        "--threshold",
        type=float,
        default=2.0,
        help="flag transfer that beats from-scratch by fewer points than this (default 2)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing --out")
    c.add_argument(
        "--resume", action="store_true", help="continue an interrupted comparison, keep its runs"
    )
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.set_defaults(func=_compare)

    e = sub.add_parser(
        "export",
        help="export a run (or a pretrained backbone) into a checked bundle",
        description="Export RUN (from `edge-tl train`) or --backbone NAME (ImageNet features "
        "and classifier) with a recipe: onnx-fp32, ort-int8, openvino-fp32, openvino-fp16, "
        "openvino-int8, or a path to a recipe .toml. The ONNX graph is checked against "
        "PyTorch on real images; INT8 is calibrated on real images; the bundle is written "
        "to a temporary folder and renamed into place.",
    )
    e.add_argument("run", nargs="?", help="run folder from `edge-tl train`")
    e.add_argument("--backbone", help="export a pretrained backbone instead of a run")
    e.add_argument("--weights", help="with --backbone: local pretrained weights file")
    e.add_argument("--recipe", default="onnx-fp32", help="recipe name or .toml path")
    e.add_argument(
        "--calib",
        help="calibration images (ImageFolder or flat folder); default: the run's training split",
    )
    e.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    e.add_argument(
        "--head-fit",
        default="artifact",
        choices=["artifact", "source"],
        help="artifact (default): refit the head on this artifact's own embeddings "
        "of the training split; source: keep the head trained in PyTorch",
    )
    e.add_argument(
        "--logits",
        action="store_true",
        help="also fuse the head into the graph as a 'logits' output (for engines used "
        "directly, without on-device learning)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.add_argument("--json", action="store_true", help="print the checks as JSON")
    e.set_defaults(func=_export)

    pr = sub.add_parser(
        "predict",
        help="classify images, or score them for anomalies, with a bundle (torch-free)",
        description="Classify IMAGES with BUNDLE's head; on a bundle with an anomaly bank "
        "(`edge-tl anomaly`), give each image's anomaly score, the threshold and a verdict "
        "(good/anomalous) instead (--classify forces the head).",
    )
    pr.add_argument("bundle", type=Path)
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--top-k", type=int, default=1)
    pr.add_argument("--classify", action="store_true", help="use the head, not the bank")
    pr.add_argument(
        "--maps", type=Path, metavar="DIR", help="anomaly: write heat-map overlay PNGs here"
    )
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=_predict)

    an = sub.add_parser(
        "anomaly",
        help="learn what good parts look like, for defect detection (torch-free)",
        description="Build BUNDLE's anomaly bank from GOOD_DIR (a folder of good images, or "
        "an MVTec-layout folder's train/good): patch features of the backbone, a greedy "
        "k-centre coreset, exact nearest-neighbour search in numpy. The threshold is "
        "calibrated for --false-alarm on the good images, each scored leave-one-out. --add "
        "grows the current bank with new good images (a new variant, new lighting) and "
        "re-calibrates; --false-alarm alone re-calibrates. Each change is a new version in "
        "BUNDLE/anomaly (`edge-tl rollback BUNDLE --anomaly` goes back).",
        epilog=EPILOG,
    )
    an.add_argument("bundle", type=Path)
    an.add_argument("good", nargs="?", metavar="GOOD_DIR", help="folder of good images")
    an.add_argument("--add", action="store_true", help="add GOOD_DIR to the current bank")
    an.add_argument(
        "--coreset",
        type=float,
        default=None,
        help="share of the good patches kept in the bank (default 0.1)",
    )
    an.add_argument(
        "--max-mb", type=float, default=None, help="cap on the bank's size in MB (default 16)"
    )
    an.add_argument(
        "--false-alarm",
        type=float,
        default=None,
        help="share of good parts the threshold may flag (default 0.01)",
    )
    an.add_argument(
        "--stages",
        default="features_s16",
        help="backbone outputs for patch features, comma-separated (default features_s16; "
        "features_s8,features_s16 gives a finer map at 4x the search)",
    )
    an.add_argument("--pool", type=int, default=3, help="neighbourhood size (default 3)")
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=_anomaly)

    ev = sub.add_parser(
        "evaluate",
        help="accuracy of a bundle on a labelled data set, or anomaly AUROC (torch-free)",
        description="Evaluate BUNDLE on DATA (ImageFolder, or 'elpv'). --split test uses the "
        "held-out split the bundle's run was trained with. On a bundle with an anomaly bank "
        "and an MVTec-layout DATA (test/good, test/<defect>, optional "
        "ground_truth/<defect>/<name>_mask.png): image AUROC, pixel AUROC, F1 and "
        "false-alarm rate at the stored threshold; --maps DIR writes overlays.",
    )
    ev.add_argument("bundle", type=Path)
    ev.add_argument("data")
    ev.add_argument("--split", default="all", choices=["all", "train", "val", "test"])
    ev.add_argument(
        "--maps", type=Path, metavar="DIR", help="anomaly: write heat-map overlay PNGs here"
    )
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_evaluate)

    le = sub.add_parser(
        "learn",
        help="teach a bundle classes from a few images, on the device (torch-free)",
        description="Learn a head on BUNDLE's embeddings from DATA (an ImageFolder of "
        "support images: DATA/<class>/<images>), or change the current head: --add grows "
        "it (new examples, new classes), --remove forgets a class, --relabel renames one, "
        "--import adopts a head learned on another device with the same backbone. Each "
        "change is a new version in BUNDLE/heads (written atomically; `edge-tl rollback` "
        "goes back).",
        epilog=EPILOG,
    )
    le.add_argument("bundle", type=Path)
    le.add_argument("data", nargs="?", help="ImageFolder of support images")
    le.add_argument(
        "--head",
        default="linear",
        choices=["linear", "prototype", "knn"],
        help="linear (default): softmax regression; prototype: SimpleShot class means; "
        "knn: nearest support images",
    )
    le.add_argument("--k", type=int, default=1, help="neighbours for --head knn (default 1)")
    le.add_argument("--add", action="store_true", help="add DATA to the current head")
    le.add_argument("--remove", metavar="CLASS", help="forget a class")
    le.add_argument("--relabel", metavar="OLD=NEW", help="rename a class")
    le.add_argument("--import", dest="import_", metavar="HEAD.npz", help="adopt a head file")
    le.add_argument(
        "--quantile",
        type=float,
        default=None,
        help="open set: share of support images (left out one at a time) the threshold "
        "may call unknown (default 0.05)",
    )
    le.add_argument("--threshold", type=float, help="open set: a fixed cosine threshold")
    le.add_argument("--no-open-set", action="store_true", help="never answer unknown")
    le.add_argument("--json", action="store_true")
    le.set_defaults(func=_learn)

    rb = sub.add_parser(
        "rollback",
        help="go back to an earlier learned head or anomaly bank (torch-free)",
        description="Make an earlier head version (--anomaly: bank version) current: by "
        "default the one before the current; --to N picks one; --list shows them all. "
        "Nothing is deleted.",
    )
    rb.add_argument("bundle", type=Path)
    rb.add_argument("--anomaly", action="store_true", help="the anomaly bank, not the head")
    rb.add_argument("--to", type=int, metavar="N")
    rb.add_argument("--list", action="store_true", help="list the versions, change nothing")
    rb.add_argument("--json", action="store_true")
    rb.set_defaults(func=_rollback)

    be = sub.add_parser(
        "bench",
        help="latency p50/p95, throughput and peak memory of a bundle (torch-free)",
        description="Measure BUNDLE in a fresh process: batch-1 predict (end to end) and "
        "engine latency p50/p95, throughput at --batch, peak RSS. With --device PROFILE "
        "(raspberry-pi-5, x86-64-avx2, x86-64-vnni, intel-core-ultra, jetson-orin, or a "
        ".toml) the profile's engine, device and threads are used where this host has "
        "them, and its budgets are checked; on other hardware the figures approximate it.",
    )
    be.add_argument("bundle", type=Path)
    be.add_argument("--device", metavar="PROFILE", help="device profile name or .toml path")
    be.add_argument(
        "--images",
        nargs="*",
        default=[],
        help="images to time (default: the bundle's self-test images)",
    )
    be.add_argument("--repeats", type=int, default=40, help="timed predictions (default 40)")
    be.add_argument("--batch", type=int, default=8, help="batch for throughput (default 8)")
    be.add_argument("--check", action="store_true", help="exit 3 when a budget does not hold")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=_bench)

    ins = sub.add_parser(
        "inspect",
        help="print a bundle's manifest, fidelity table and verified hashes",
        description="Read BUNDLE's manifest, check every file's SHA-256 and print the "
        "artifact, preprocessing, outputs, the fidelity table measured at export and the "
        "accuracy-control steps. Nothing is run.",
    )
    ins.add_argument("bundle", type=Path)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_inspect)

    ver = sub.add_parser(
        "verify",
        help="check a bundle on this host: hashes and the embedding self-test (torch-free)",
        description="Check every file's SHA-256, load the engine and run the bundle's "
        "reference images: their embeddings must match FP32 within the tolerance the export "
        "recorded. Exit 0 when the bundle is fit to run here, 2 when not (or when the recipe "
        "says warn: 0 with a warning).",
    )
    ver.add_argument("bundle", type=Path)
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=_verify)

    d = sub.add_parser(
        "demo",
        help="the whole story on ELPV: train, export FP32/INT8, evaluate, compare",
        description="Train on ELPV (75/25 split, seed 0), export ONNX FP32, ORT INT8 and "
        "OpenVINO INT8, evaluate each on the held-out split and print accuracy, size and "
        "latency per artifact.",
    )
    d.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="folder for the run and bundles (default ./demo-output)",
    )
    d.add_argument("--strategy", default="finetune")
    d.add_argument("--epochs", type=int, default=6)
    d.add_argument("--train-stages", type=int, default=1)
    d.set_defaults(func=_demo)
    return p


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _training_args(t: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``compare`` (defaults: see TrainConfig)."""
    t.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (default), efficientnet_lite1/2, resnet18, resnet50, "
        "mobilenet_v3_large, vgg16",
    )
    t.add_argument(
        "--weights",
        help="local pretrained weights (state dict .pth/.safetensors) for the backbone; "
        "needed for torchvision backbones without internet",
    )
    t.add_argument("--epochs", type=int, default=8, help="maximum epochs (default 8)")
    t.add_argument(
        "--train-stages",
        type=int,
        default=2,
        help="finetune/gradual: how many final stages train (default 2)",
    )
    t.add_argument(
        "--stages", default="", help="selective: stage indices, e.g. 5,6 (negative from the end)"
    )
    t.add_argument(
        "--params", default="", help="selective: parameter-name patterns, e.g. 'net.layer4.*'"
    )
    t.add_argument(
        "--unfreeze-every", type=int, default=1, help="gradual: epochs per unfrozen stage"
    )
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr-head", type=float, default=1e-3, help="head learning rate (1e-3)")
    t.add_argument(
        "--lr-backbone", type=float, default=1e-4, help="last-stage learning rate (1e-4)"
    )
    t.add_argument(
        "--layer-decay",
        type=float,
        default=0.8,
        help="learning-rate factor per stage towards the input (default 0.8)",
    )
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=0.2, help="dropout before the head (0.2)")
    t.add_argument(
        "--patience",
        type=int,
        default=4,
        help="stop after this many epochs without a better validation score (0: never)",
    )
    t.add_argument(
        "--balance",
        default="none",
        choices=["none", "sampler", "loss"],
        help="class balancing for imbalanced data: sampler or loss weights (default none)",
    )
    t.add_argument(
        "--augment",
        default="auto",
        help="auto (default: inspection for grey data, natural for colour), inspection, "
        "natural, none; overrides like 'inspection,rotate=5,blur=0'",
    )
    t.add_argument(
        "--views",
        type=int,
        default=1,
        help="cached training: activations of this many views per image (1 clean + "
        "augmented ones; default 1)",
    )
    t.add_argument(
        "--no-cache",
        action="store_true",
        help="run the frozen prefix on every step instead of caching its activations",
    )
    t.add_argument(
        "--freeze-bn", action="store_true", help="keep every batch-norm layer's statistics"
    )
    t.add_argument("--test-frac", type=float, default=0.2, help="held-out test share (default 0.2)")
    t.add_argument("--val-frac", type=float, default=0.1, help="validation share (default 0.1)")
    t.add_argument(
        "--train-per-class",
        type=int,
        default=0,
        help="cap the training split per class (a CPU budget; default 0 = all)",
    )
    t.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on GPUs that support it, fp32 on CPUs",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the trained part")
    t.add_argument(
        "--no-channels-last", action="store_true", help="keep NCHW memory format on images"
    )
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    t.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware fine-tuning: train through simulated INT8 rounding (weights "
        "per channel, activations per tensor) so an INT8 export keeps the accuracy; runs "
        "uncached",
    )
    t.add_argument(
        "--no-onnx-cache",
        action="store_true",
        help="cache boundary activations with PyTorch instead of ONNX Runtime",
    )


def _config(args, strategy: str) -> TrainConfig:
    from dataclasses import fields

    from edge_tl.train import TrainConfig

    try:
        stages = tuple(int(s) for s in args.stages.split(",") if s.strip())
    except ValueError:
        raise EdgeTLError(f"--stages {args.stages!r} must be integers like 5,6") from None
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values.update(
        strategy=strategy,
        stages=stages,
        params=tuple(p.strip() for p in args.params.split(",") if p.strip()),
        cache=not args.no_cache,
        onnx_cache=not args.no_onnx_cache,
        channels_last=not args.no_channels_last,
    )
    return TrainConfig(**values)


def _train(args) -> int:
    from edge_tl.train import train

    cfg = _config(args, args.strategy)
    metrics = train(args.data, args.out, cfg, force=args.force, resume=args.resume)
    if args.json:
        _print_json(metrics)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {cfg.strategy} on {args.data}: test accuracy "
            f"{metrics['test_accuracy']:.4f} (n={metrics['n_test']}) -> {args.out}"
        )
    return 0


def _compare(args) -> int:
    from edge_tl.train.compare import compare, markdown, parse_strategies

    strategies = parse_strategies(args.strategies)
    base = _config(args, strategies[0])
    result = compare(
        args.data,
        args.out,
        strategies,
        base,
        threshold=args.threshold / 100,
        force=args.force,
        resume=args.resume,
    )
    if args.json:
        _print_json({k: v for k, v in result.items()})
    else:
        print(markdown(result))
        print(f"table, curves and runs -> {args.out}")
    return 0


def _export(args) -> int:
    from edge_tl.pipeline import export_bundle

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
    )
    if args.json:
        _print_json(m.metrics)
        return 0
    mt = m.metrics
    cos = mt["embedding_cosine_vs_fp32"]
    line = (
        f"exported {m.artifact.recipe} -> {args.out}: parity max abs diff "
        f"{mt['parity_max_abs_diff']['embedding']:.1e}, embedding cosine vs FP32 "
        f"{cos['mean']:.4f} (min {cos['min']:.4f})"
    )
    if "test_accuracy" in mt:
        line += (
            f", held-out accuracy {mt['test_accuracy']:.4f} (FP32 {mt['fp32_test_accuracy']:.4f}, "
            f"n={mt['test_n']})"
        )
    if "accuracy_control" in mt:
        line += f"; accuracy control: {mt['accuracy_control']}"
    print(line + f"; report {args.out / 'fidelity.md'}")
    return 0


def _predict(args) -> int:
    from edge_tl.runtime import Model

    model = Model(args.bundle)
    if model.anomaly_state is not None and not args.classify:
        return _predict_anomaly(model, args)
    if args.maps:
        raise EdgeTLError(
            f"--maps needs an anomaly bank; build one with `edge-tl anomaly {args.bundle} GOOD_DIR`"
        )
    results = model.predict([str(p) for p in args.images], top_k=args.top_k)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            sim = "" if r["similarity"] is None else f"\tsimilarity {r['similarity']:.3f}"
            print(f"{r['image']}\t{r['label']}\t{r['score']:.3f}{sim}")
    return 0


def _predict_anomaly(model, args) -> int:
    from edge_tl.runtime.anomaly import overlay

    results = model.score([str(p) for p in args.images], maps=args.maps is not None)
    if args.maps is not None:
        args.maps.mkdir(parents=True, exist_ok=True)
        for r in results:
            out = args.maps / f"{Path(r['image']).stem}.png"
            overlay(r.pop("pil"), r.pop("map"), r["threshold"], r["score"], None).save(out)
            r["map_png"] = str(out)
    if args.json:
        _print_json(results)
    else:
        for r in results:
            extra = f"\t{r['map_png']}" if "map_png" in r else ""
            thr = f"(threshold {r['threshold']:.3f})"
            print(f"{r['image']}\t{r['verdict']}\t{r['score']:.3f}\t{thr}{extra}")
    return 0


def _anomaly(args) -> int:
    from edge_tl.runtime import Model
    from edge_tl.runtime.anomaly import DEFAULT_CORESET, DEFAULT_FALSE_ALARM, DEFAULT_MAX_MB

    model = Model(args.bundle)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if args.good is None:
        if args.false_alarm is None or args.add:
            raise EdgeTLError(
                f"pass GOOD_DIR (a folder of good images), or --false-alarm R alone to "
                f"re-calibrate the current bank: `edge-tl anomaly {args.bundle} GOOD_DIR`"
            )
        state = model.set_false_alarm(args.false_alarm)
    elif args.add:
        if args.coreset is not None or args.max_mb is not None:
            raise EdgeTLError(
                "--add keeps the bank's --coreset and --max-mb; build a new bank to change them"
            )
        state = model.add_good(args.good)
        if args.false_alarm is not None:
            state = model.set_false_alarm(args.false_alarm)
    else:
        state = model.fit_anomaly(
            args.good,
            stages,
            args.pool,
            DEFAULT_CORESET if args.coreset is None else args.coreset,
            DEFAULT_MAX_MB if args.max_mb is None else args.max_mb,
            DEFAULT_FALSE_ALARM if args.false_alarm is None else args.false_alarm,
        )
    summary = state.summary()
    if args.json:
        _print_json(summary)
    else:
        print(
            f"{args.bundle}: anomaly bank v{summary['version']} ({summary['op']}): "
            f"{summary['images']} good images, {summary['bank_patches']} patches "
            f"({summary['bank_mb']} MB, cap {summary['max_mb']} MB), threshold "
            f"{summary['threshold']} for {summary['false_alarm']:.1%} false alarms"
        )
    return 0


def _learn(args) -> int:
    from edge_tl.runtime import Model

    actions = [
        n
        for n, v in (
            ("DATA", args.data),
            ("--remove", args.remove),
            ("--relabel", args.relabel),
            ("--import", args.import_),
        )
        if v
    ]
    open_set = args.quantile is not None or args.threshold is not None or args.no_open_set
    if len(actions) > 1:
        raise EdgeTLError(f"give one of {', '.join(actions)} per call; run learn once for each")
    if not actions and not open_set:
        raise EdgeTLError(
            "nothing to learn: give DATA (an ImageFolder of support images), --remove, "
            "--relabel, --import, or an open-set setting (--quantile/--threshold/--no-open-set)"
        )
    if args.add and not args.data:
        raise EdgeTLError("--add needs DATA, the images to add")
    if args.quantile is not None and not 0 <= args.quantile < 1:
        raise EdgeTLError(f"--quantile must be in [0, 1), not {args.quantile}")
    if args.k < 1:
        raise EdgeTLError(f"--k must be at least 1, not {args.k}")
    relabel = None
    if args.relabel:
        old, sep, new = args.relabel.partition("=")
        if not sep or not old or not new:
            raise EdgeTLError(f"--relabel takes OLD=NEW, not {args.relabel!r}")
        relabel = (old, new)
    model = Model(args.bundle)
    before = model.state.summary() if model.state is not None else None
    quantile = None if args.no_open_set else (0.05 if args.quantile is None else args.quantile)
    if args.data and not args.add:
        state = model.learn(args.data, head=args.head, quantile=quantile, k=args.k)
    elif args.data:
        state = model.add(args.data)
    elif args.remove:
        state = model.remove_class(args.remove)
    elif relabel:
        state = model.relabel(*relabel)
    elif args.import_:
        state = model.import_head(args.import_)
    else:
        state = model.state
    # a fresh learn took the quantile already; a fixed threshold, or a setting given with
    # another change, is one more version
    fresh = bool(args.data) and not args.add
    if args.threshold is not None or (open_set and not fresh):
        state = model.set_threshold(None if args.no_open_set else args.threshold, quantile)
    summary = state.summary()
    if args.json:
        _print_json({"bundle": str(args.bundle), "head": summary, "previous": before})
        return 0
    counts = ", ".join(f"{n} {c}" for n, c in summary["support"].items())
    thr = summary["threshold"]
    print(
        f"{args.bundle}: head v{summary['version']} ({summary['head']}, {summary['op']}): "
        f"{len(summary['labels'])} classes ({counts} support images); "
        + ("open set off" if thr is None else f"unknown below similarity {thr:.3f}")
        + (f"; fit {summary['fit_ms']:.1f} ms" if "fit_ms" in summary else "")
    )
    if summary["threshold"] is None and not args.no_open_set and not state.open_set_ready:
        missing = [n for n, c in summary["support"].items() if c == 0]
        print(f"  open set needs support images of every class; none for {', '.join(missing)}")
    return 0


def _rollback(args) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.runtime.anomaly import AnomalyStore
    from edge_tl.runtime.learner import HeadStore

    manifest = read_manifest(args.bundle, verify=True)
    if args.anomaly:
        store: HeadStore = AnomalyStore(args.bundle, manifest)
        empty = "no anomaly bank yet"

        def line(h: dict) -> str:
            return (
                f"{h['op']:<9} {h['images']} images, {h['bank_patches']} patches, "
                f"threshold {h['threshold']}"
            )

        def done(h: dict) -> str:
            return (
                f"anomaly bank v{h['version']} is current again ({h['images']} images, "
                f"threshold {h['threshold']})"
            )
    else:
        store = HeadStore(args.bundle, manifest)
        empty = "no learned head yet (the exported head is in use)"

        def line(h: dict) -> str:
            more = " ..." if len(h["labels"]) > 6 else ""
            return (
                f"{h['op']:<16} {h['head']:<9} {len(h['labels'])} classes: "
                f"{', '.join(h['labels'][:6])}{more}"
            )

        def done(h: dict) -> str:
            return (
                f"head v{h['version']} is current again ({h['head']}, "
                f"{len(h['labels'])} classes: {', '.join(h['labels'])})"
            )

    if args.list:
        history = store.history()
        if args.json:
            _print_json(history)
            return 0
        if not history:
            print(f"{args.bundle}: {empty}")
        for h in history:
            if "error" in h:
                print(f"  v{h['version']}: unreadable ({h['error']})")
                continue
            print(f"{'*' if h['current'] else ' '} v{h['version']} {h['created']} {line(h)}")
        return 0
    summary = store.rollback(args.to).summary()
    if args.json:
        _print_json(summary)
    else:
        print(f"{args.bundle}: {done(summary)}")
    return 0


def _bench(args) -> int:
    from edge_tl.runtime.bench import bench
    from edge_tl.spec import load_profile

    if args.repeats < 1 or args.batch < 1:
        raise EdgeTLError("--repeats and --batch must be at least 1")
    profile = load_profile(args.device) if args.device else None
    for img in args.images:
        if not Path(img).is_file():
            raise EdgeTLError(f"image {img} does not exist; pass image files to --images")
    res = bench(args.bundle, profile, args.images, args.repeats, args.batch)
    failed = [k for k, b in res.get("budgets", {}).items() if not b["holds"]]
    if args.json:
        _print_json(res)
    else:
        print(
            f"{args.bundle} ({res['artifact']}) on {res['host']['cpu']}"
            + (f", profile {profile.name} (device {res['device_used']})" if profile else "")
        )
        print(
            f"  predict batch 1: p50 {res['predict_p50_ms']:.1f} ms, p95 "
            f"{res['predict_p95_ms']:.1f} ms (engine alone p50 {res['engine_p50_ms']:.1f}, "
            f"p95 {res['engine_p95_ms']:.1f}); throughput {res['throughput_ips']:.0f} img/s at "
            f"batch {res['batch']}; peak RSS {res['peak_rss_mb']:.0f} MB; load "
            f"{res['load_ms']:.0f} ms"
        )
        for name, b in res.get("budgets", {}).items():
            verdict = "holds" if b["holds"] else "MISSED"
            print(f"  budget {name}: {b['measured']} vs {b['budget']} -> {verdict}")
        for note in res.get("notes", []):
            print(f"  note: {note}")
    return 3 if args.check and failed else 0


def _evaluate(args) -> int:
    from edge_tl.data import fingerprint, open_dataset, stratified_split
    from edge_tl.runtime import Model

    model = Model(args.bundle)
    if model.anomaly_state is not None and (Path(args.data) / "test").is_dir():
        return _evaluate_anomaly(model, args)
    if (Path(args.data) / "test").is_dir():
        raise EdgeTLError(
            f"{args.data} is an MVTec-layout folder but {args.bundle} has no anomaly bank; "
            f"build one with `edge-tl anomaly {args.bundle} {args.data}`"
        )
    if args.maps:
        raise EdgeTLError("--maps is for anomaly banks on an MVTec-layout folder")
    ds = open_dataset(args.data)
    if args.split != "all":
        split = model.manifest.source.get("split")
        if not split:
            raise EdgeTLError(f"bundle {args.bundle} records no training split; use --split all")
        expected = split.get("data_fingerprint")
        if expected and fingerprint(ds) != expected:
            raise EdgeTLError(
                f"{args.data} is not the data set this bundle was trained on (other classes or "
                f"images), so --split {args.split} would not be its held-out split; use --split all"
            )
        ds = ds.subset(
            stratified_split(ds.labels, split["test_frac"], split["val_frac"], split["seed"])[
                args.split
            ]
        )
    res = model.evaluate(ds)
    if args.json:
        _print_json(res)
    else:
        head = res["head"]
        version = "exported head" if head["version"] is None else f"head v{head['version']}"
        print(
            f"accuracy {res['accuracy']:.4f} on {res['n']} images ({res['artifact']}, "
            f"{version}, {head['head']})"
            + (f"; {res['unknown_rate']:.1%} called unknown" if res["unknown_rate"] else "")
        )
        for name, pc in res["per_class"].items():
            print(f"  {name:<24} {pc['accuracy']:.4f}  (n={pc['n']})")
    return 0


def _evaluate_anomaly(model, args) -> int:
    if args.split != "all":
        raise EdgeTLError("--split is for classification; an MVTec folder has its own test/")
    res = model.evaluate_anomaly(args.data, args.maps)
    if args.json:
        _print_json(res)
        return 0
    pix = "n/a (no masks)" if res["pixel_auroc"] is None else f"{res['pixel_auroc']:.4f}"
    print(
        f"image AUROC {res['image_auroc']:.4f}, pixel AUROC {pix} on {res['n_good']} good + "
        f"{res['n_defective']} defective images ({res['artifact']}, bank v"
        f"{res['bank']['version']}, {res['ms_per_image']} ms/image)"
    )
    print(
        f"at threshold {res['threshold']:.3f}: F1 {res['f1']:.4f}, recall {res['recall']:.4f}, "
        f"precision {res['precision']:.4f}, false alarms {res['false_alarm_rate']:.1%} "
        f"(target {res['target_false_alarm']:.1%})"
    )
    for name, a in res["per_defect_auroc"].items():
        print(f"  {name:<24} image AUROC {a:.4f}")
    if res["maps"]:
        print(f"overlays -> {res['maps']}")
    return 0


def _inspect(args) -> int:
    from edge_tl.bundle import read_manifest
    from edge_tl.fidelity import table
    from edge_tl.runtime.anomaly import AnomalyStore
    from edge_tl.runtime.learner import HeadStore

    m = read_manifest(args.bundle, verify=True)
    report_path = args.bundle / "fidelity.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    learned = HeadStore(args.bundle, m).history()
    banks = AnomalyStore(args.bundle, m).history()
    if args.json:
        _print_json(
            {
                **m.to_dict(),
                "hashes_verified": True,
                "fidelity": report,
                "learned_heads": learned,
                "anomaly_banks": banks,
            }
        )
        return 0
    a = m.artifact
    print(f"bundle {args.bundle}: {m.backbone}, {a.format} {a.precision} (recipe {a.recipe})")
    print(
        f"  input {m.input_name} {m.preprocess.size}x{m.preprocess.size} {m.preprocess.colour}, "
        f"mean {m.preprocess.mean}, std {m.preprocess.std}"
    )
    print(f"  outputs: {', '.join(f'{k} {v}' for k, v in m.outputs.items())}")
    print(
        f"  labels ({len(m.labels)}): {', '.join(m.labels[:8])}"
        + (" ..." if len(m.labels) > 8 else "")
    )
    if a.engine_options:
        print(f"  engine options: {a.engine_options}")
    if m.self_test:
        st = m.self_test
        print(
            f"  self-test: {st['file']}, cosine >= {st['min_cosine']} on load "
            f"({st['on_fail']} otherwise; {st['export_cosine']} on {st['export_host']})"
        )
    for h in learned:
        if h.get("current"):
            print(
                f"  learned head: v{h['version']} of {len(learned)} ({h['head']}, {h['op']}, "
                f"{h['created']}), {len(h['labels'])} classes, open-set threshold "
                f"{h['threshold']}; `edge-tl rollback {args.bundle} --list` for all"
            )
    for h in banks:
        if h.get("current"):
            print(
                f"  anomaly bank: v{h['version']} of {len(banks)} ({h['op']}, {h['created']}), "
                f"{h['images']} good images, {h['bank_patches']} patches ({h['bank_mb']} MB), "
                f"threshold {h['threshold']} for {h['false_alarm']:.1%} false alarms"
            )
    if report is not None:
        print(
            f"fidelity ({report['checked_on']}, {report['n_images']} images, on "
            f"{report['host']['cpu']}): {report['verdict']}"
        )
        print(table(report))
        for step in report.get("accuracy_control") or []:
            drop = "" if step["top1_drop"] is None else f", top-1 drop {step['top1_drop']:.4f}"
            print(
                f"  {'pass' if step['passed'] else 'miss'}: {step['step']} (cosine "
                f"{step['cosine_mean']:.4f}{drop})"
            )
    for f, h in m.files.items():
        print(f"verified {f} sha256 {h[:16]}...")
    return 0


def _verify(args) -> int:
    from edge_tl.runtime import Model

    model = Model(args.bundle, self_test=False)  # hashes checked here
    from edge_tl.runtime.selftest import enforce, run_self_test

    result = run_self_test(model.path, model.manifest, model.engine)
    out = {"bundle": str(args.bundle), "hashes_verified": True, "self_test": result}
    if args.json:
        _print_json(out)
    elif result is None:
        print(f"{args.bundle}: hashes verified; the bundle has no self-test")
    else:
        verdict = "passed" if result["passed"] else "FAILED"
        print(
            f"{args.bundle}: hashes verified; self-test {verdict} on {result['host']} "
            f"({result['cpu_class']}): embedding cosine vs FP32 {result['cosine']:.4f} "
            f"(min {result['cosine_min']:.4f}; needs >= {result['min_cosine']:.4f}; "
            f"{result['export_cosine']} at export), {result['ms']:.0f} ms"
        )
    enforce(model.path, result)
    return 0


def _demo(args) -> int:
    from edge_tl.demo import run_demo

    run_demo(args.out, strategy=args.strategy, epochs=args.epochs, train_stages=args.train_stages)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
