"""The ``edge-tl`` argument parser: subcommands, flags and their help."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_tl import __version__
from edge_tl.cli import commands
from edge_tl.cli.training_flags import add_training_flags
from edge_tl.spec import STRATEGIES, TEXT_STRATEGIES

__all__ = ["EPILOG", "SKIP_BAD_HELP", "build_parser"]

EPILOG = (
    "Docs and examples: README.md. Every command exits 2 with a one-line error on bad input. "
    "Folders: hidden and OS files (.DS_Store, Thumbs.db, desktop.ini, ._*, __MACOSX) are "
    "ignored; images are .jpg .jpeg .png .bmp .tif .tiff .webp .gif .pgm .ppm in any case; "
    "images over EDGE_TL_MAX_PIXELS (default 120,000,000) pixels are refused."
)
SKIP_BAD_HELP = (
    "leave files that are not readable images out, and list them at the end (and under "
    '"skipped" with --json); by default the first one stops the command'
)
BUNDLE_HELP = "bundle folder from `edge-tl export`, or its archive from `edge-tl pack`"


def add_trust(p: argparse.ArgumentParser) -> None:
    """``--trust KEY.pub`` (repeatable) on a command that loads a bundle."""
    p.add_argument(
        "--trust",
        action="append",
        type=Path,
        metavar="KEY.pub",
        help="trusted public key (NAME.pub from `edge-tl keygen`) or a folder of .pub files; "
        "repeatable. With one, unsigned bundles, bundles signed by other keys and bundles "
        "changed after signing are refused (default: $EDGE_TL_TRUST; without either, files "
        "are checked by their hashes only)",
    )


def add_class_threshold(p: argparse.ArgumentParser) -> None:
    """``--class-threshold CLASS=T``: the decision rule of :mod:`edge_tl.runtime.operating`."""
    p.add_argument(
        "--class-threshold",
        action="append",
        default=[],
        metavar="CLASS=T",
        help="classification: call CLASS when its probability is >= T (in [0, 1]), else the "
        "most probable other class (T from `evaluate --split val --min-recall CLASS=R`); "
        "one class",
    )


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
    t.set_defaults(func=commands.train)

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
    c.set_defaults(func=commands.compare)

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
    se.set_defaults(func=commands.select)

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
    e.set_defaults(func=commands.export)

    pr = sub.add_parser(
        "predict",
        epilog=EPILOG,
        help="classify images or texts, or score images for anomalies, with a bundle (torch-free)",
        description="Classify IMAGES with BUNDLE's head; on a bundle with an anomaly bank "
        "(`edge-tl anomaly`), give each image's anomaly score, the threshold and a verdict "
        "(good/anomalous) instead (--classify forces the head). A text bundle classifies "
        "the texts of --text and --text-file instead.",
    )
    pr.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(pr)
    pr.add_argument("images", nargs="*", type=Path, help="image files (an image bundle)")
    pr.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text to classify (a text bundle; repeatable)",
    )
    pr.add_argument(
        "--text-file",
        type=Path,
        metavar="FILE",
        help="texts to classify: one per line (UTF-8), or the --text-column of a .csv/.tsv/.jsonl",
    )
    pr.add_argument(
        "--text-column",
        default=None,
        metavar="NAME",
        help="--text-file as a table: the column holding the text (default text)",
    )
    pr.add_argument(
        "--top-k", type=int, default=1, help="classification: the k best labels (default 1)"
    )
    pr.add_argument("--classify", action="store_true", help="use the head, not the bank")
    pr.add_argument(
        "--maps", type=Path, metavar="DIR", help="anomaly: write heat-map overlay PNGs here"
    )
    pr.add_argument(
        "--search",
        choices=["fast", "exact"],
        default=None,
        help="anomaly: search the bank's inverted lists (fast, default) or every bank patch "
        "(exact)",
    )
    add_class_threshold(pr)
    pr.add_argument("--json", action="store_true", help="print the results as JSON")
    pr.set_defaults(func=commands.predict)

    an = sub.add_parser(
        "anomaly",
        help="learn what good parts look like, for defect detection (torch-free)",
        description="Build BUNDLE's anomaly bank from GOOD_DIR (a folder of good images, or "
        "an MVTec-layout folder's train/good; features streamed, memory bounded): patch "
        "features of the backbone, a greedy k-centre coreset, nearest-neighbour search in "
        "numpy (inverted lists; `predict/evaluate --search exact` for the exact one). The "
        "threshold is "
        "calibrated for --false-alarm on the good images, each scored leave-one-out. --add "
        "grows the current bank with new good images (a new variant, new lighting) and "
        "re-calibrates; --false-alarm alone re-calibrates. Each change is a new version in "
        "BUNDLE/anomaly (`edge-tl rollback BUNDLE --anomaly` goes back).",
        epilog=EPILOG,
    )
    an.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(an)
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
        default=None,
        help="backbone outputs for patch features, comma-separated (default features_s16; "
        "features_s8,features_s16 gives a finer map at 4x the search); a new bank only",
    )
    an.add_argument(
        "--pool",
        type=int,
        default=None,
        help="neighbourhood size, odd (default 3); a new bank only",
    )
    an.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    an.add_argument("--json", action="store_true", help="print the bank's summary as JSON")
    an.set_defaults(func=commands.anomaly)

    ev = sub.add_parser(
        "evaluate",
        epilog=EPILOG,
        help="accuracy of a bundle on a labelled data set, or anomaly AUROC (torch-free)",
        description="Evaluate BUNDLE on DATA (ImageFolder, or 'elpv', 'elpv:mono', 'elpv:poly'; "
        "for a text bundle, "
        "text data: a .csv/.tsv/.jsonl with --text-column and --label-column, a folder "
        "<class>/<file>.txt, or trec6, trec6:train, trec6:test, bbc-news, disaster-tweets). "
        "--split test uses the held-out split the bundle's run was trained with. On a "
        "bundle with an anomaly bank and an MVTec-layout DATA (test/good, test/<defect>, optional "
        "ground_truth/<defect>/<name>_mask.png): image AUROC, pixel AUROC, F1 and "
        "false-alarm rate at the stored threshold; --maps DIR writes overlays.",
    )
    ev.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(ev)
    ev.add_argument(
        "data", help="ImageFolder, 'elpv', an MVTec-layout folder, or text data (a text bundle)"
    )
    ev.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val", "test"],
        help="all images (default), or that part of the split the bundle's run used",
    )
    ev.add_argument(
        "--maps", type=Path, metavar="DIR", help="anomaly: write heat-map overlay PNGs here"
    )
    ev.add_argument(
        "--search",
        choices=["fast", "exact"],
        default=None,
        help="anomaly: search the bank's inverted lists (fast, default) or every bank patch "
        "(exact)",
    )
    ev.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    ev.add_argument(
        "--text-column",
        default=None,
        metavar="NAME",
        help="text data: the column (JSON key) holding the text (default text)",
    )
    ev.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="text data: the column (JSON key) holding the class name (default label)",
    )
    ev.add_argument(
        "--tasks",
        metavar="NAME[,NAME...]",
        help="read DATA's labels for these tasks (elpv's defect/type, a labels .csv's "
        "columns): a bundle trained with --tasks type is scored on DATA's type labels; a "
        "multi-task bundle reads its own tasks without it",
    )
    ev.add_argument(
        "--min-recall",
        action="append",
        default=[],
        metavar="CLASS=R",
        help="classification: the largest threshold on CLASS's probability whose recall of "
        "CLASS on these images is >= R (in (0, 1]), with its precision, accuracy and "
        "false-alarm rate beside the arg-max's (repeatable, or comma-separated). Chosen on "
        "the images it is measured on, so optimistic there: choose it with --split val, "
        "check it with --split test --class-threshold CLASS=T",
    )
    add_class_threshold(ev)
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(func=commands.evaluate)

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
    le.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(le)
    le.add_argument(
        "data",
        nargs="?",
        help="ImageFolder of support images; for a text bundle, text data (.csv/.tsv/.jsonl, "
        "a folder <class>/<file>.txt, or a named set such as trec6:train)",
    )
    le.add_argument(
        "--head",
        default=None,
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
    le.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    le.add_argument(
        "--text-column",
        default=None,
        metavar="NAME",
        help="text data: the column (JSON key) holding the text (default text)",
    )
    le.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="text data: the column (JSON key) holding the class name (default label)",
    )
    le.add_argument(
        "--task",
        metavar="NAME",
        help="multi-task bundle: the task whose head learns (the others stay as they are); "
        "DATA is then an ImageFolder of that task's classes, or the multi-task source (elpv, "
        "a labels .csv)",
    )
    le.add_argument("--json", action="store_true", help="print the new head's summary as JSON")
    le.set_defaults(func=commands.learn)

    ad = sub.add_parser(
        "adapt",
        epilog=EPILOG,
        help="align a bundle to a new camera or line from unlabelled images (torch-free)",
        description="Align BUNDLE's embeddings to TARGET, unlabelled images from the new "
        "camera or line, so its head answers on them as on the images it was trained on: "
        "coral (default) whitens the target embeddings' covariance and re-colours them "
        "with the training images' (stored by the export); center re-centres them on the "
        "target mean (SimpleShot's CL2N). The head is unchanged; the alignment is a new "
        "head version, applied by predict, evaluate and learn from then on. --off (or "
        "`edge-tl rollback`) undoes it.",
    )
    ad.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(ad)
    ad.add_argument(
        "target",
        nargs="?",
        help="unlabelled target images: a folder of images, an ImageFolder (labels are "
        "ignored), or 'elpv:mono' / 'elpv:poly'",
    )
    ad.add_argument(
        "--method",
        default=None,
        choices=["coral", "center"],
        help="coral (default): covariance alignment; center: the target mean as the centre",
    )
    ad.add_argument(
        "--reg",
        type=float,
        default=None,
        metavar="R",
        help="coral: covariances regularised as C + R*I, in embedding units (default 1, as "
        "in Sun et al. 2016)",
    )
    ad.add_argument("--off", action="store_true", help="turn the alignment in force off")
    ad.add_argument("--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    ad.add_argument("--json", action="store_true", help="print the new head's summary as JSON")
    ad.set_defaults(func=commands.adapt)

    rb = sub.add_parser(
        "rollback",
        epilog=EPILOG,
        help="go back to an earlier learned head or anomaly bank (torch-free)",
        description="Make an earlier head version (--anomaly: bank version) current: by "
        "default the one before the current; --to N picks one; --list shows them all. "
        "Nothing is deleted.",
    )
    rb.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(rb)
    rb.add_argument("--anomaly", action="store_true", help="the anomaly bank, not the head")
    rb.add_argument(
        "--to", type=int, metavar="N", help="make version N current (default: the previous one)"
    )
    rb.add_argument("--list", action="store_true", help="list the versions, change nothing")
    rb.add_argument("--task", metavar="NAME", help="multi-task bundle: that task's head versions")
    rb.add_argument("--json", action="store_true", help="print the result as JSON")
    rb.set_defaults(func=commands.rollback)

    sv = sub.add_parser(
        "serve",
        epilog=EPILOG,
        help="serve bundles over HTTP: Open Inference Protocol v2, learning, a web page "
        "(torch-free)",
        description="Load each BUNDLE once (hashes, signature, self-test) and serve it over "
        "HTTP: the Open Inference Protocol v2 (GET /v2/health/ready, /v2/models/NAME, POST "
        "/v2/models/NAME/infer, as Triton, OpenVINO Model Server and KServe speak it), "
        "learning endpoints under /v2/models/NAME/ (learn, remove, relabel, good, calibrate, "
        "versions, rollback; they need the bearer token of --token-file), Prometheus metrics "
        "at /metrics, the API's documentation at /docs and a web page at /. Listens on "
        "127.0.0.1 unless --host says otherwise. Needs the serve extra: pip install "
        "'edge_tl[serve]'.",
    )
    sv.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help=BUNDLE_HELP)
    add_trust(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    sv.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="the model name of the first, second, ... BUNDLE in URLs (repeatable; default: "
        "the bundle's folder name)",
    )
    sv.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the bearer token (first line, at least 16 characters) that "
        "learning, rollback and version calls need; without it they are refused (403)",
    )
    sv.add_argument(
        "--token-for-infer",
        action="store_true",
        help="inference and model metadata need the token too",
    )
    sv.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes, each loading every bundle (default 1; learning in one is "
        "seen by the others before their next prediction)",
    )
    sv.add_argument(
        "--max-body-mb",
        type=float,
        default=32.0,
        help="largest request body in MB; larger ones get 413 (default 32)",
    )
    sv.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="largest uploaded image in pixels, checked before decoding; larger ones get "
        "413 (default 40,000,000)",
    )
    sv.add_argument("--ssl-certfile", type=Path, metavar="PEM", help="TLS certificate")
    sv.add_argument("--ssl-keyfile", type=Path, metavar="PEM", help="TLS private key")
    sv.set_defaults(func=commands.serve)

    be = sub.add_parser(
        "bench",
        epilog=EPILOG,
        help="latency p50/p95, throughput and peak memory of a bundle (torch-free)",
        description="Measure BUNDLE in a fresh process: batch-1 predict (end to end) and "
        "engine latency p50/p95, throughput at --batch, peak RSS. With --profile PROFILE "
        "(raspberry-pi-5, x86-64-avx2, x86-64-vnni, intel-core-ultra, jetson-orin, or a "
        ".toml) the profile's engine, device and threads are used where this host has "
        "them, and its budgets are checked; on other hardware the figures approximate it.",
    )
    be.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    add_trust(be)
    be.add_argument("--profile", metavar="PROFILE", help="device profile name or .toml path")
    be.add_argument("--device", dest="device_alias", metavar="PROFILE", help=argparse.SUPPRESS)
    be.add_argument(
        "--images",
        nargs="*",
        default=[],
        help="images to time (default: the bundle's self-test images)",
    )
    be.add_argument("--repeats", type=int, default=40, help="timed predictions (default 40)")
    be.add_argument("--batch", type=int, default=8, help="batch for throughput (default 8)")
    be.add_argument("--check", action="store_true", help="exit 3 when a budget does not hold")
    be.add_argument("--json", action="store_true", help="print the measurements as JSON")
    be.set_defaults(func=commands.bench)

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
    ins.set_defaults(func=commands.inspect)

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
    ver.set_defaults(func=commands.verify)

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
    kg.set_defaults(func=commands.keygen)

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
    sg.set_defaults(func=commands.sign)

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
    pk.set_defaults(func=commands.pack)

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
    up.set_defaults(func=commands.unpack)

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
    d.set_defaults(func=commands.demo)
    return p
