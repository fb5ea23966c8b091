"""The device-side subcommands' flags (torch-free at run time): ``predict``, ``anomaly``,
``evaluate``, ``learn``, ``adapt``, ``rollback``, ``serve`` and ``bench``."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_tl.cli import commands_device
from edge_tl.cli.common_flags import (
    BUNDLE_HELP,
    EPILOG,
    SKIP_BAD_HELP,
    add_class_threshold,
    add_trust,
)

__all__ = ["add_device_commands"]


def add_device_commands(sub: argparse._SubParsersAction) -> None:
    """Add the device-side subcommands to ``sub`` (``edge-tl``'s subparsers)."""
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
    pr.set_defaults(func=commands_device.predict)

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
        help="share of the good patches kept in the bank (default 0.5)",
    )
    an.add_argument(
        "--max-mb",
        type=float,
        default=None,
        help="cap on the bank's size in MB, at half precision (default 16)",
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
    an.set_defaults(func=commands_device.anomaly)

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
    ev.set_defaults(func=commands_device.evaluate)

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
    le.set_defaults(func=commands_device.learn)

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
    ad.set_defaults(func=commands_device.adapt)

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
    rb.set_defaults(func=commands_device.rollback)

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
    sv.set_defaults(func=commands_device.serve)

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
    be.set_defaults(func=commands_device.bench)
