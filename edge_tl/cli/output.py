"""What ``edge-tl`` prints for a person: one function per result, plain text on stdout.

Nothing here decides anything; ``--json`` prints the library's own records instead.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.report import FidelityReport, table
from edge_tl.runtime.results import (
    AnomalyEvaluation,
    Evaluation,
    OperatingPoint,
    Prediction,
    TaskEvaluation,
    TaskPrediction,
    Verdict,
)
from edge_tl.spec import Manifest, TextPreprocess

__all__ = [
    "bank_summary",
    "bench",
    "evaluation",
    "export",
    "head_summary",
    "history",
    "inspect",
    "predictions",
    "print_json",
    "rolled_back",
    "skipped",
    "verify",
]


def print_json(obj: Any) -> None:
    """``obj`` as JSON that parses: a NaN or infinity (a metric with nothing to measure)
    is written as ``null``."""
    print(json.dumps(_finite(obj), indent=2, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def skipped(files: list[dict[str, str]] | None) -> None:
    """The files ``--skip-bad`` left out, one line each on stderr, after the result."""
    if not files:
        return
    print(f"edge-tl: skipped {len(files)} bad file(s) (--skip-bad):", file=sys.stderr)
    for f in files:
        print(f"  {f['path']}: {f['reason']}", file=sys.stderr)


def export(manifest: Manifest, out: Path) -> None:
    mt = manifest.metrics
    cos = mt["embedding_cosine_vs_fp32"]
    line = (
        f"exported {manifest.artifact.recipe} -> {out}: parity max abs diff "
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
    print(line + f"; report {out / 'fidelity.md'}")


def predictions(results: list[Prediction] | list[Verdict] | list[TaskPrediction]) -> None:
    for r in results:
        if isinstance(r, TaskPrediction):  # image, then task=label score for each task
            answers = "\t".join(f"{t}={p.label} {p.score:.3f}" for t, p in r.tasks.items())
            print(f"{r.image}\t{answers}")
        elif isinstance(r, Verdict):
            extra = f"\t{r.map_png}" if r.map_png else ""
            print(f"{r.image}\t{r.verdict}\t{r.score:.3f}\t(threshold {r.threshold:.3f}){extra}")
        else:
            sim = "" if r.similarity is None else f"\tsimilarity {r.similarity:.3f}"
            more = "".join(f"\t{t['label']} {t['score']:.3f}" for t in r.top_k[1:])
            src = r.image if r.text is None else _one_line(r.text)
            print(f"{src}\t{r.label}\t{r.score:.3f}{sim}{more}")


def _one_line(text: str, width: int = 60) -> str:
    """A text on one short line: white space runs as one space, cut at ``width``."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def evaluation(res: Evaluation | AnomalyEvaluation | TaskEvaluation, unit: str = "image") -> None:
    if isinstance(res, AnomalyEvaluation):
        _anomaly_evaluation(res)
        return
    if isinstance(res, TaskEvaluation):
        print(f"mean task accuracy {res.mean_accuracy:.4f} on {res.n} {unit}s ({res.artifact})")
        for name, r in res.tasks.items():
            print(f"task {name}: ", end="")
            evaluation(r, unit)
        return
    head = res.head
    version = "exported head" if head["version"] is None else f"head v{head['version']}"
    rule = res.class_threshold
    print(
        f"accuracy {res.accuracy:.4f} on {res.n} {unit}s ({res.artifact}, {version}, "
        f"{head['head']})"
        + (f"; {res.unknown_rate:.1%} called unknown" if res.unknown_rate else "")
        + (
            f"; rule: {rule['label']} when P({rule['label']}) >= {_threshold(rule['threshold'])}"
            if rule
            else ""
        )
    )
    print(f"  {'class':<24}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}")
    for name, pc in res.per_class.items():
        print(
            f"  {name:<24}{pc['precision']:>10.4f}{pc['recall']:>8.4f}{pc['f1']:>8.4f}"
            f"{pc['support']:>9}"
        )
    print(
        f"  {'macro average':<24}{res.macro_precision:>10.4f}{res.macro_recall:>8.4f}"
        f"{res.macro_f1:>8.4f}{res.n:>9}"
    )
    for point in res.operating_points:
        _operating_point(point)


def _threshold(t: float) -> str:
    """A threshold as the shortest text that reads back as the same float32 (a threshold
    found among float32 probabilities keeps its recall when typed back in)."""
    if float(np.float32(t)) != t:  # a float64 threshold: all its digits
        return repr(t)
    return np.format_float_positional(np.float32(t), trim="-")


def _operating_point(p: OperatingPoint) -> None:
    """One class threshold's figures beside the arg-max's."""
    t = _threshold(p.threshold)
    asked = (
        f"--min-recall {p.label}={p.min_recall:g}"
        if p.min_recall is not None
        else f"--class-threshold {p.label}={t}"
    )
    print(
        f"{asked}: threshold {t} ({p.label} when P({p.label}) >= {t}, else the most "
        f"probable other class; {p.n_class} {p.label} + {p.n_other} other)"
    )
    print(f"  {'':<28}{'arg-max':>9}{'at threshold':>14}")
    a, b = p.argmax, p.at_threshold
    for name, x, y in (
        (f"{p.label} recall", a.recall, b.recall),
        (f"{p.label} precision", a.precision, b.precision),
        ("accuracy", a.accuracy, b.accuracy),
    ):
        print(f"  {name:<28}{x:>9.4f}{y:>14.4f}")
    print(
        f"  {'others called ' + p.label:<28}{a.false_alarm_rate:>9.1%}{b.false_alarm_rate:>14.1%}"
    )
    if p.caveat:
        print(f"  note: {p.caveat}")


def _anomaly_evaluation(res: AnomalyEvaluation) -> None:
    pix = "n/a (no masks)" if res.pixel_auroc is None else f"{res.pixel_auroc:.4f}"
    print(
        f"image AUROC {res.image_auroc:.4f}, pixel AUROC {pix} on {res.n_good} good + "
        f"{res.n_defective} defective images ({res.artifact}, bank v{res.bank['version']}, "
        f"{res.ms_per_image} ms/image)"
    )
    print(
        f"at threshold {res.threshold:.3f}: F1 {res.f1:.4f}, recall {res.recall:.4f}, "
        f"precision {res.precision:.4f}, false alarms {res.false_alarm_rate:.1%} "
        f"(target {res.target_false_alarm:.1%})"
    )
    for name, a in res.per_defect_auroc.items():
        print(f"  {name:<24} image AUROC {a:.4f}")
    if res.maps:
        print(f"overlays -> {res.maps}")


def bank_summary(bundle: Path, s: dict[str, Any]) -> None:
    print(
        f"{bundle}: anomaly bank v{s['version']} ({s['op']}): {s['images']} good images, "
        f"{s['bank_patches']} patches ({s['bank_mb']} MB, cap {s['max_mb']} MB), threshold "
        f"{s['threshold']} for {s['false_alarm']:.1%} false alarms"
    )


def head_summary(bundle: Path, s: dict[str, Any]) -> None:
    counts = ", ".join(f"{n} {c}" for n, c in s["support"].items())
    thr = s["threshold"]
    print(
        f"{bundle}: head v{s['version']} ({s['head']}, {s['op']}): {len(s['labels'])} classes "
        f"({counts} support images); "
        + ("open set off" if thr is None else f"unknown below similarity {thr:.3f}")
        + (f"; fit {s['fit_ms']:.1f} ms" if "fit_ms" in s else "")
    )
    if s.get("open_set_problem"):
        print(f"  {s['open_set_problem']}")


def adapted(bundle: Path, s: dict[str, Any]) -> None:
    if "alignment" in s:
        what = f"embeddings aligned to the target ({s['alignment']})"
        undo = f"undo: `edge-tl adapt {bundle} --off` or `edge-tl rollback {bundle}`"
    else:
        what, undo = "alignment off", f"back: `edge-tl rollback {bundle}`"
    print(
        f"{bundle}: head v{s['version']} ({s['head']}, {len(s['labels'])} classes): {what}; {undo}"
    )


def _version_line(h: dict[str, Any], anomaly: bool) -> str:
    if anomaly:
        return (
            f"{h['op']:<9} {h['images']} images, {h['bank_patches']} patches, "
            f"threshold {h['threshold']}"
        )
    more = " ..." if len(h["labels"]) > 6 else ""
    return (
        f"{h['op']:<16} {h['head']:<9} {len(h['labels'])} classes: "
        f"{', '.join(h['labels'][:6])}{more}"
    )


def history(bundle: Path, versions: list[dict[str, Any]], anomaly: bool) -> None:
    if not versions:
        what = (
            "no anomaly bank yet"
            if anomaly
            else "no learned head yet (the exported head is in use)"
        )
        print(f"{bundle}: {what}")
    for h in versions:
        if "error" in h:
            print(f"  v{h['version']}: unreadable ({h['error']})")
            continue
        mark = "*" if h["current"] else " "
        print(f"{mark} v{h['version']} {h['created']} {_version_line(h, anomaly)}")


def rolled_back(bundle: Path, h: dict[str, Any], anomaly: bool) -> None:
    if anomaly:
        what = (
            f"anomaly bank v{h['version']} is current again ({h['images']} images, "
            f"threshold {h['threshold']})"
        )
    else:
        what = (
            f"head v{h['version']} is current again ({h['head']}, "
            f"{len(h['labels'])} classes: {', '.join(h['labels'])})"
        )
    print(f"{bundle}: {what}")


def bench(bundle: Path, res: dict[str, Any], profile: str | None) -> None:
    print(
        f"{bundle} ({res['artifact']}) on {res['host']['cpu']}"
        + (f", profile {profile} (device {res['device_used']})" if profile else "")
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


def inspect(
    bundle: Path,
    m: Manifest,
    report: FidelityReport | None,
    heads: list[dict[str, Any]],
    banks: list[dict[str, Any]],
    signature: dict[str, Any],
) -> None:
    a = m.artifact
    print(f"bundle {bundle}: {m.backbone}, {a.format} {a.precision} (recipe {a.recipe})")
    print(f"  {signature_line(signature)}")
    pre = m.preprocess
    if isinstance(pre, TextPreprocess):
        print(
            f"  input text: tokenizer {pre.tokenizer}, at most {pre.max_length} tokens, "
            f"inputs {', '.join(pre.inputs)}; {pre.pooling} pooling of {pre.hidden_output}"
            + (", L2-normalised" if pre.normalize else "")
        )
    else:
        print(
            f"  input {m.input_name} {pre.size}x{pre.size} {pre.colour}, "
            f"mean {pre.mean}, std {pre.std}"
        )
    print(f"  outputs: {', '.join(f'{k} {v}' for k, v in m.outputs.items())}")
    if m.labels:
        print(
            f"  labels ({len(m.labels)}): {', '.join(m.labels[:8])}"
            + (" ..." if len(m.labels) > 8 else "")
        )
    elif m.head is None:
        print(f"  no head (a pretrained encoder): learn one with `edge-tl learn {bundle} DATA`")
    if a.engine_options:
        print(f"  engine options: {a.engine_options}")
    if m.self_test:
        st = m.self_test
        print(
            f"  self-test: {st.file}, cosine >= {st.min_cosine} on load "
            f"({st.on_fail} otherwise; {st.export_cosine} on {st.export_host})"
        )
    for h in heads:
        if h.get("current"):
            print(
                f"  learned head: v{h['version']} of {len(heads)} ({h['head']}, {h['op']}, "
                f"{h['created']}), {len(h['labels'])} classes, open-set threshold "
                f"{h['threshold']}; `edge-tl rollback {bundle} --list` for all"
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
            f"fidelity ({report.checked_on}, {report.n_images} {report.unit}, on "
            f"{report.host['cpu']}): {report.verdict}"
        )
        print(table(report))
        for step in report.accuracy_control:
            drop = "" if step.top1_drop is None else f", top-1 drop {step.top1_drop:.4f}"
            print(
                f"  {'pass' if step.passed else 'miss'}: {step.step} (cosine "
                f"{step.cosine_mean:.4f}{drop})"
            )
    for f, h in m.files.items():
        print(f"verified {f} sha256 {h[:16]}...")


def signature_line(s: dict[str, Any]) -> str:
    """``signed by key ... at ..., verified against the trusted keys`` or why not."""
    if not s["signed"]:
        return "unsigned (sign it with `edge-tl sign BUNDLE --key NAME.key`)"
    checked = (
        "verified against the trusted keys"
        if s.get("verified")
        else "not checked: no trusted keys (pass --trust NAME.pub or set $EDGE_TL_TRUST)"
    )
    return f"signed by key {s['key_id']} at {s['signed_at']}, {checked}"


def signed(bundle: Path, s: dict[str, Any]) -> None:
    print(
        f"signed {bundle} with key {s['key_id']} at {s['signed_at']} ({bundle}/manifest.sig); "
        f"devices check it with --trust NAME.pub"
    )


def verify(bundle: Path, result: dict[str, Any] | None, signature: dict[str, Any]) -> None:
    print(f"{bundle}: {signature_line(signature)}")
    if result is None:
        print(f"{bundle}: hashes verified; the bundle has no self-test")
        return
    verdict = "passed" if result["passed"] else "FAILED"
    print(
        f"{bundle}: hashes verified; self-test {verdict} on {result['host']} "
        f"({result['cpu_class']}): embedding cosine vs FP32 {result['cosine']:.4f} "
        f"(min {result['cosine_min']:.4f}; needs >= {result['min_cosine']:.4f}; "
        f"{result['export_cosine']} at export), {result['ms']:.0f} ms"
    )
