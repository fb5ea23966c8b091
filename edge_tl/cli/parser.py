"""The ``edge-tl`` argument parser: subcommands, flags and their help."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_tl import __version__
from edge_tl.cli import commands_bundle, commands_train
from edge_tl.cli.common_flags import (
    BUNDLE_HELP,
    EPILOG,
    SKIP_BAD_HELP,
    add_trust,
)
from edge_tl.cli.device_flags import add_device_commands
from edge_tl.cli.training_flags import add_training_flags
from edge_tl.spec import STRATEGIES, TEXT_STRATEGIES

__all__ = ["EPILOG", "SKIP_BAD_HELP", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Every ``edge-tl`` subcommand and its flags; each calls :mod:`edge_tl.cli.commands`."""
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
        epilog=EPILOG,
        help="train a classifier on images or texts and write a run folder",
        description="Train on DATA (an ImageFolder <class>/<image>, or 'elpv' / 'elpv:mono' / "
        "'elpv:poly' for the ELPV solar-cell package) with a transfer strategy: auto "
        "(default: linear-probe, finetune or full, chosen from the images per class and the "
        "validation split), linear-probe, finetune (the last --train-stages stages + head), "
        "full, selective, bn-only, bias-only, gradual, from-scratch. When everything before the "
        "first trainable block is frozen, its activations are computed once and cached. "
        "Interrupted runs continue with --resume. Under torchrun (torchrun "
        "--nproc-per-node N -m edge_tl.cli train ...) it trains with "
        "DistributedDataParallel. Text data (CSV/TSV, JSON Lines, <class>/*.txt, or "
        "trec6:train, bbc-news, ...) fine-tunes a text encoder (all-minilm-l6-v2): "
        "linear-probe, finetune (the last --train-layers layers + head), full.",
    )
    t.add_argument("data", help="ImageFolder path, 'elpv', 'elpv:mono', 'elpv:poly'; or text data")
    t.add_argument("--out", required=True, type=Path, help="run folder to create")
    add_training_flags(t)
    t.add_argument(
        "--strategy",
        help=f"one of {', '.join(STRATEGIES)} (default auto: a linear probe, the last stages "
        "or the whole network fine-tuned, chosen on the validation split); text: "
        f"{', '.join(TEXT_STRATEGIES)} (default finetune)",
    )
    t.add_argument("--force", action="store_true", help="replace an existing --out")
    t.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint.pt"
    )
    t.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    t.add_argument("--json", action="store_true", help="print the metrics as JSON")
    da = t.add_argument_group(
        "domain adaptation (images): labelled DATA, unlabelled target images; a labelled target "
        "is split, adapted on its larger part and scored on the held-out quarter"
    )
    da.add_argument(
        "--target-unlabeled",
        metavar="TARGET",
        help="target images: a flat folder, an ImageFolder, or elpv:mono / elpv:poly",
    )
    da.add_argument(
        "--adapt",
        help="mcc (default with --target-unlabeled), adabn, coral, dann, none",
    )
    da.add_argument(
        "--adapt-weight",
        type=float,
        help="weight of the coral / dann / mcc loss (default: coral 1000, its loss being "
        "~1e-4 on embeddings; dann 1; mcc 1)",
    )
    t.set_defaults(func=commands_train.train)

    c = sub.add_parser(
        "compare",
        epilog=EPILOG,
        help="train several strategies on the same splits; table, curves, negative transfer",
        description="Train each of --strategies on DATA with the same splits and settings, "
        "each in its own process; print and save a table (accuracy, macro-F1, train time, "
        "trainable parameters, peak memory) and the learning curves, and flag negative "
        "transfer (from-scratch as good as a transfer strategy, or transfer gaining less "
        "than --threshold).",
    )
    c.add_argument("data", help="ImageFolder path, 'elpv', 'elpv:mono', 'elpv:poly'; or text data")
    c.add_argument(
        "--strategies",
        help="comma-separated (default linear-probe,finetune,full,bn-only,from-scratch; on "
        "text linear-probe,finetune,full)",
    )
    c.add_argument("--out", required=True, type=Path, help="comparison folder to create")
    add_training_flags(c)
    c.add_argument(
        "--threshold",
        type=float,
        default=2.0,
        help="flag transfer that beats from-scratch by fewer points than this (default 2)",
    )
    c.add_argument(
        "--select",
        metavar="DIR",
        help="an `edge-tl select` output for the same data: its score of --backbone is shown "
        "beside the negative-transfer check",
    )
    c.add_argument("--force", action="store_true", help="replace an existing --out")
    c.add_argument(
        "--resume", action="store_true", help="continue an interrupted comparison, keep its runs"
    )
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")
    c.set_defaults(func=commands_train.compare)

    se = sub.add_parser(
        "select",
        epilog=EPILOG,
        help="rank pre-trained backbones for your images in minutes (LogME, LEEP, H-score)",
        description="Embed DATA with each of --backbones (frozen, pretrained) and rank them by "
        "LogME (You et al. 2021), with LEEP and H-score beside it, instead of fine-tuning "
        "each. Randomly initialised features of the best architecture are scored too: when "
        "the best pre-trained features do not beat them, negative transfer is flagged. With "
        "--results (fine-tuned accuracies for the same data), the weighted Kendall tau "
        "between each score's ranking and the accuracies is reported and --out gets a plot "
        "of score against accuracy.",
    )
    se.add_argument("data", help="ImageFolder path, 'elpv', 'elpv:mono' or 'elpv:poly'")
    se.add_argument(
        "--backbones",
        help="comma-separated image backbones (default: every one with pretrained weights on "
        "this machine, e.g. efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,"
        "mobilenet_v2)",
    )
    se.add_argument(
        "--results",
        action="append",
        metavar="PATH",
        help="fine-tuned results on the same data: a run folder (edge-tl train), a compare "
        "folder (its best transfer strategy), or a .json file {backbone: accuracy}; repeatable",
    )
    se.add_argument(
        "--out", type=Path, help="folder for select.json, select.md and select.png (optional)"
    )
    se.add_argument(
        "--per-class",
        type=int,
        default=0,
        metavar="N",
        help="score at most N images per class (a seeded sample; default 0: all)",
    )
    se.add_argument("--seed", type=int, default=0, help="seed of the --per-class sample")
    se.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the random-init features (no negative-transfer check; one embedding less)",
    )
    se.add_argument(
        "--no-onnx-cache",
        action="store_true",
        help="embed with PyTorch instead of the exported graph (slower)",
    )
    se.add_argument("--force", action="store_true", help="replace an existing --out")
    se.add_argument("--json", action="store_true", help="print the selection as JSON")
    se.set_defaults(func=commands_train.select)

    e = sub.add_parser(
        "export",
        epilog=EPILOG,
        help="export a run (or a pretrained backbone) into a checked bundle",
        description="Export RUN (from `edge-tl train`) or --backbone NAME (ImageNet features "
        "and classifier; a text encoder such as all-minilm-l6-v2 without a head) with a "
        "recipe: onnx-fp32, ort-int8, ort-int8-avx2 (images; fast without VNNI), ort-int8-dynamic "
        "(text), openvino-fp32, openvino-fp16, "
        "openvino-int8, or a path to a recipe .toml. The ONNX graph is checked against "
        "PyTorch on real images or texts; INT8 is calibrated on real images or texts; the "
        "bundle is written to a temporary folder and renamed into place. Text models go "
        "through optimum (ONNX, ONNX Runtime quantization, OpenVINO and NNCF).",
    )
    e.add_argument("run", nargs="?", help="run folder from `edge-tl train`")
    e.add_argument("--backbone", help="export a pretrained backbone instead of a run")
    e.add_argument("--weights", help="with --backbone: local pretrained weights file")
    e.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="with --backbone: the graph's input size (a multiple of 32; default the "
        "backbone's own, 224 for efficientnet_lite0); larger inputs give finer anomaly maps "
        "(`edge-tl anomaly` scores at the bundle's size)",
    )
    e.add_argument(
        "--recipe",
        default="onnx-fp32",
        help="recipe name or .toml path; several, comma-separated (onnx-fp32,ort-int8,"
        "openvino-int8), build one bundle each in --out/<recipe> sharing their work (exit 1 "
        "when accuracy control refused any; the others are written)",
    )
    e.add_argument(
        "--calib",
        help="calibration images (ImageFolder or flat folder), or for a text model texts (one "
        "per line, or a CSV/TSV/JSONL with a 'text' column); default: the run's training "
        "and validation data",
    )
    e.add_argument(
        "--out",
        required=True,
        type=Path,
        help="bundle folder to create (with several recipes: the folder that holds them)",
    )
    e.add_argument(
        "--no-cache",
        action="store_true",
        help="do not reuse or keep the run's FP32 graph, decoded images and FP32 embeddings "
        "(kept in RUN/.export_cache between exports of the same run)",
    )
    e.add_argument(
        "--head-fit",
        choices=["artifact", "source"],
        help="artifact (default): refit the head on this artifact's own embeddings "
        "of the training and validation images; source (default with --adapt-bn): keep the "
        "head trained in PyTorch",
    )
    e.add_argument(
        "--adapt-bn",
        metavar="TARGET",
        help="AdaBN: re-estimate batch-norm statistics on TARGET images (a folder, an "
        "ImageFolder, elpv:mono / elpv:poly) before the export, for a new line or camera "
        "without retraining; calibrates on them without --calib, and checks on a labelled "
        "TARGET's held-out quarter",
    )
    e.add_argument(
        "--logits",
        action="store_true",
        help="also fuse the head into the graph as a 'logits' output (for engines used "
        "directly, without on-device learning)",
    )
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.add_argument(
        "--sign",
        type=Path,
        metavar="NAME.key",
        help="sign the bundle with this private key (from `edge-tl keygen`) before it is "
        "renamed into place",
    )
    e.add_argument("--skip-bad", action="store_true", help="--calib: " + SKIP_BAD_HELP)
    e.add_argument("--json", action="store_true", help="print the checks as JSON")
    e.set_defaults(func=commands_train.export)

    add_device_commands(sub)

    ins = sub.add_parser(
        "inspect",
        epilog=EPILOG,
        help="print a bundle's manifest, signature, fidelity table and verified hashes",
        description="Read BUNDLE's manifest, check every file's SHA-256 (and, with trusted "
        "keys, its signature) and print who signed it, the artifact, preprocessing, outputs, "
        "the fidelity table measured at export and the accuracy-control steps. Nothing is "
        "run.",
    )
    ins.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(ins)
    ins.add_argument("--json", action="store_true", help="print everything as JSON")
    ins.set_defaults(func=commands_bundle.inspect)

    ver = sub.add_parser(
        "verify",
        epilog=EPILOG,
        help="check a bundle on this host: hashes, signature, embedding self-test (torch-free)",
        description="Check every file's SHA-256 (and, with trusted keys, the signature; "
        "without, say whether and by which key it is signed), load the engine and run the bundle's "
        "reference images: their embeddings must match FP32 within the tolerance the export "
        "recorded. Exit 0 when the bundle is fit to run here, 2 when not (or when the recipe "
        "says warn: 0 with a warning).",
    )
    ver.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(ver)
    ver.add_argument("--json", action="store_true", help="print the result as JSON")
    ver.set_defaults(func=commands_bundle.verify)

    kg = sub.add_parser(
        "keygen",
        epilog=EPILOG,
        help="create an Ed25519 key pair for signing bundles",
        description="Write NAME.key (the private key, PEM, mode 0600: keep it on the "
        "workstation that signs) and NAME.pub (the public key: copy it to devices and pass "
        "it to --trust). Prints the key id (the first 16 hex digits of the SHA-256 of the "
        "raw public key), which `inspect` shows for a signed bundle.",
    )
    kg.add_argument("name", type=Path, metavar="NAME", help="path of the pair, without suffix")
    kg.add_argument("--force", action="store_true", help="replace an existing pair")
    kg.add_argument("--json", action="store_true", help="print the key id and paths as JSON")
    kg.set_defaults(func=commands_bundle.keygen)

    sg = sub.add_parser(
        "sign",
        epilog=EPILOG,
        help="sign a bundle's manifest (which holds every file's SHA-256)",
        description="Check BUNDLE's files against their hashes, then sign manifest.json "
        "with --key (Ed25519): BUNDLE/manifest.sig, replacing an earlier signature. A device "
        "given the public key (--trust NAME.pub or $EDGE_TL_TRUST) refuses the bundle when it "
        "is unsigned, signed by another key, or changed after signing. Learned heads and "
        "anomaly banks written on the device later do not touch the signature.",
    )
    sg.add_argument("bundle", type=Path, help="bundle folder from `edge-tl export`")
    sg.add_argument("--key", required=True, type=Path, metavar="NAME.key", help="private key")
    sg.add_argument("--json", action="store_true", help="print the signature's key id as JSON")
    sg.set_defaults(func=commands_bundle.sign)

    pk = sub.add_parser(
        "pack",
        epilog=EPILOG,
        help="pack a bundle into one deterministic .tar file",
        description="Check BUNDLE's hashes and write it as one tar file: members sorted, "
        "mtime 0, no owners, regular files and folders only, so packing twice gives the same "
        "bytes. The signature and the learned heads/anomaly versions go with it; lock and "
        "temporary files do not. Commands that read a bundle (predict, evaluate, verify, "
        "inspect, bench, rollback --list) take the archive directly.",
    )
    pk.add_argument("bundle", type=Path, help="bundle folder from `edge-tl export`")
    pk.add_argument("out", type=Path, metavar="OUT.tar", help="archive to write")
    pk.add_argument("--force", action="store_true", help="replace an existing OUT.tar")
    pk.add_argument("--json", action="store_true", help="print the archive's size and hash")
    pk.set_defaults(func=commands_bundle.pack)

    up = sub.add_parser(
        "unpack",
        epilog=EPILOG,
        help="unpack a bundle archive into a folder (to learn on it)",
        description="Extract ARCHIVE into the new folder DIR, refusing absolute paths, '..', "
        "links, devices, duplicate names, members over $EDGE_TL_ARCHIVE_MAX_MEMBER_MB "
        "(default 2048) and archives over $EDGE_TL_ARCHIVE_MAX_MB (default 4096) before "
        "anything is written; then check the bundle's hashes (and signature, with --trust).",
    )
    up.add_argument("archive", type=Path, help="archive from `edge-tl pack`")
    up.add_argument("out", type=Path, metavar="DIR", help="folder to create")
    add_trust(up)
    up.add_argument("--json", action="store_true", help="print the result as JSON")
    up.set_defaults(func=commands_bundle.unpack)

    d = sub.add_parser(
        "demo",
        epilog=EPILOG,
        help="the whole story on ELPV: train, export FP32/INT8, evaluate, compare",
        description="Train on ELPV (or --data, an ImageFolder; 75/25 split, seed 0), export "
        "ONNX FP32, ORT INT8 and OpenVINO INT8 (or --recipes), evaluate each on the held-out "
        "split and print accuracy, size and latency per artifact. A recipe that accuracy "
        "control refuses is shown as refused, with what was tried.",
    )
    d.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the run and bundles (default ./demo-output, ./demo-output-text)",
    )
    d.add_argument("--data", default="elpv", help="'elpv' (default) or an ImageFolder path")
    d.add_argument(
        "--recipes",
        default=None,
        help="export recipes, comma-separated (default onnx-fp32,ort-int8-avx2,openvino-int8; "
        "with --text onnx-fp32,ort-int8,openvino-int8)",
    )
    d.add_argument("--strategy", default="finetune", help="transfer strategy (default finetune)")
    d.add_argument(
        "--text",
        action="store_true",
        help="the text story instead: fine-tune all-MiniLM-L6-v2 on TREC-6, export ONNX FP32 / "
        "ORT INT8 / OpenVINO INT8 through optimum, evaluate on the 500 test questions, then "
        "few-shot learning on the device (about 10 minutes on 2 cores; --out default "
        "./demo-output-text)",
    )
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 6; text 3)")
    d.add_argument(
        "--train-stages", type=int, default=1, help="finetune: final stages trained (default 1)"
    )
    d.set_defaults(func=commands_train.demo)
    return p
