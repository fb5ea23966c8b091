"""Multi-task data: one list of images, one label per task (several columns or folder levels).

Torch-free floor module. Three sources, each a set of label *columns*:

- ``elpv`` (and ``elpv:mono`` / ``elpv:poly``): ``defect`` (functional / defective, the
  package's defect probability >= 0.5) and ``type`` (mono / poly, from its metadata);
- an ImageFolder ``N`` levels deep, ``root/<task 1 class>/.../<task N class>/<image>``: the
  columns are the levels, named by ``tasks`` in order;
- a CSV labels file ``path,<task 1>,<task 2>,...`` (a header row; paths relative to the
  file's folder): the columns are the header's names after ``path``.

The split is stratified by the *joint class* (one per combination of every column's
classes, named ``a+b``), whichever tasks are chosen, so a multi-task run and the one-task
runs on the same source (``--tasks defect``, ``--tasks type``) hold out the same images.
With two or more tasks the data set's ``labels`` are the joint classes and
:attr:`~edge_tl.data.Dataset.tasks` maps them to each task's class; with one task it is an
ordinary data set of that task's classes, stratified by the joint class
(:attr:`~edge_tl.data.Dataset.strata`).

Example:
    >>> ds = open_tasks("elpv", ["defect", "type"])  # doctest: +SKIP
    >>> ds.tasks.names, ds.tasks.classes  # doctest: +SKIP
    (('defect', 'type'), (('functional', 'defective'), ('mono', 'poly')))
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_tl.data import ELPV, ELPV_SUBSETS, Dataset, elpv, is_named_image_set
from edge_tl.errors import EdgeTLError
from edge_tl.images import check_images, entries, is_image_name
from edge_tl.spec import check_labels

__all__ = [
    "ELPV_TASKS",
    "JOINT_SEPARATOR",
    "TaskSet",
    "open_tasks",
    "parse_tasks",
    "parse_weights",
    "task_dataset",
]

ELPV_TASKS = {"defect": ("functional", "defective"), "type": ("mono", "poly")}
"""The ELPV package's label columns and their classes."""
JOINT_SEPARATOR = "+"
"""Joins task classes into a joint class name (``defective+mono``)."""


@dataclass(frozen=True)
class TaskSet:
    """The tasks of a multi-task data set.

    ``table[j, t]`` (int64 ``[n_joint, n_tasks]``) is the class index in task ``t`` of joint
    class ``j`` (the data set's ``labels`` index the joint classes).
    """

    names: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    table: np.ndarray

    def index(self, task: str) -> int:
        """The position of ``task``.

        Raises:
            EdgeTLError: no such task, naming the tasks there are.
        """
        if task not in self.names:
            raise EdgeTLError(f"no task {task!r}; the tasks are {', '.join(self.names)}")
        return self.names.index(task)

    def labels(self, joint: np.ndarray, task: str) -> np.ndarray:
        """int64 class indices of ``task`` for joint-class indices ``joint``."""
        return self.table[np.asarray(joint, np.int64), self.index(task)]

    def to_records(self) -> list[dict[str, Any]]:
        """``[{"name": ..., "labels": [...]}, ...]``, as ``run.json`` keeps them."""
        pairs = zip(self.names, self.classes, strict=True)
        return [{"name": n, "labels": list(c)} for n, c in pairs]


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"defect,type"`` -> ``("defect", "type")``.

    Raises:
        EdgeTLError: an empty name or a name given twice.
    """
    names = tuple(n.strip() for n in text.split(","))
    if not names or not all(names):
        raise EdgeTLError(f"--tasks {text!r} has an empty name; write names like defect,type")
    if len(set(names)) != len(names):
        raise EdgeTLError(f"--tasks {text!r} names a task twice; name each task once")
    check_labels(list(names), "--tasks", fix="rename the task")
    return names


def parse_weights(text: str, n_tasks: int) -> tuple[float, ...]:
    """``"1,0.5"`` -> ``(1.0, 0.5)``: one non-negative finite weight per task, not all 0.

    Raises:
        EdgeTLError: not numbers, the wrong count, negative, or all zero.
    """
    try:
        w = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EdgeTLError(f"--task-weights {text!r} are not numbers; write e.g. 1,1") from None
    if len(w) != n_tasks:
        raise EdgeTLError(
            f"--task-weights gives {len(w)} weight(s) for {n_tasks} task(s); give one per task"
        )
    if not all(np.isfinite(w)) or min(w) < 0 or max(w) == 0:
        raise EdgeTLError(f"--task-weights {text!r} must be 0 or more, finite, not all 0")
    return w


def open_tasks(spec: str | Path, tasks: Sequence[str], skip_bad: bool = False) -> Dataset:
    """The images of ``spec`` labelled for ``tasks`` (see the module docstring).

    Args:
        spec: ``elpv`` (``elpv:mono``/``elpv:poly``), a ``.csv`` labels file, or a folder
            ``len(tasks)`` levels deep.
        tasks: task names: ELPV's ``defect``/``type``, the CSV's column names, or names
            for the folder levels, outermost first.
        skip_bad: leave unreadable images out (listed in ``skipped``).

    Raises:
        EdgeTLError: an unknown task, a task with one class, a bad CSV row, a folder whose
            depth is not the number of tasks; one line naming it and the fix.
    """
    tasks = tuple(tasks)
    if not tasks:
        raise EdgeTLError("no tasks given; pass --tasks NAME[,NAME...]")
    if is_named_image_set(spec):
        name, paths, columns, skipped = _elpv_columns(str(spec))
    elif str(spec).lower().endswith(".csv") and Path(spec).is_file():
        name, paths, columns, skipped = _csv_columns(Path(spec), skip_bad)
    elif Path(spec).is_dir():
        name, paths, columns, skipped = _folder_columns(Path(spec), tasks, skip_bad)
    else:
        raise EdgeTLError(
            f"{spec} is not multi-task data; pass elpv, a labels file path,<task>,... (.csv) "
            "or a folder <task 1 class>/<task 2 class>/<image>"
        )
    unknown = [t for t in tasks if t not in columns]
    if unknown:
        raise EdgeTLError(f"{spec} has no task {unknown[0]!r}; its tasks are {', '.join(columns)}")
    return _build(name, paths, columns, tasks, tuple(skipped))


def task_dataset(ds: Dataset, task: str) -> Dataset:
    """One task's view of a multi-task data set: same images, that task's classes.

    Raises:
        EdgeTLError: ``ds`` has no such task.
    """
    if ds.tasks is None:
        raise EdgeTLError(f"{ds.name} is not a multi-task data set; it has no task {task!r}")
    t = ds.tasks.index(task)
    return Dataset(
        f"{ds.name}:{task}",
        list(ds.tasks.classes[t]),
        ds.paths,
        ds.tasks.table[ds.labels, t],
        ds.meta,
        ds.skipped,
        ds.modality,
        strata=ds.labels,
    )


# ---- building ----------------------------------------------------------------------------
def _build(
    name: str,
    paths: list[str],
    columns: dict[str, tuple[list[str], np.ndarray]],
    tasks: tuple[str, ...],
    skipped: tuple[Any, ...],
) -> Dataset:
    """The data set of ``tasks`` from every ``column`` (``{name: (classes, labels[N])}``)."""
    for t in tasks:
        classes, y = columns[t]
        present = np.unique(y)
        if len(present) < 2:
            only = classes[int(present[0])] if len(present) else "none"
            raise EdgeTLError(
                f"task {t!r} of {name} has one class ({only}); a task needs two or more "
                "classes: add images of another class or leave the task out"
            )
    # the joint class of every column (not only the chosen tasks): one split for all runs
    keys = np.stack([y for _, y in columns.values()], axis=1)
    combos, joint = np.unique(keys, axis=0, return_inverse=True)
    joint = joint.reshape(-1).astype(np.int64)
    names = [
        JOINT_SEPARATOR.join(columns[c][0][k] for c, k in zip(columns, row, strict=True))
        for row in combos.tolist()
    ]
    if len(tasks) == 1:
        classes, y = columns[tasks[0]]
        return Dataset(f"{name}:{tasks[0]}", list(classes), paths, y, skipped=skipped, strata=joint)
    order = list(columns)
    table = np.stack([combos[:, order.index(t)] for t in tasks], axis=1).astype(np.int64)
    task_set = TaskSet(tasks, tuple(tuple(columns[t][0]) for t in tasks), table)
    return Dataset(name, names, paths, joint, skipped=skipped, tasks=task_set)


def _elpv_columns(spec: str) -> tuple[str, list[str], dict, list]:
    ds = elpv(cell_type=ELPV_SUBSETS.get(spec))
    kinds = ELPV_TASKS["type"]
    types = np.asarray([kinds.index(m["type"]) for m in ds.meta], np.int64)
    columns = {"defect": (list(ELPV_TASKS["defect"]), ds.labels), "type": (list(kinds), types)}
    return (ELPV if spec == ELPV else spec), ds.paths, columns, []


def _encode(values: list[str], where: str) -> tuple[list[str], np.ndarray]:
    classes = sorted(set(values))
    check_labels(classes, where, fix="rename the class")
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([index[v] for v in values], np.int64)


def _csv_columns(path: Path, skip_bad: bool) -> tuple[str, list[str], dict, list]:
    """``path,<task>,...`` rows; every row complete, every path an image under the folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeTLError(f"{path} cannot be read ({e}); pass a UTF-8 CSV labels file") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows or [c.strip() for c in rows[0]][:1] != ["path"] or len(rows[0]) < 2:
        raise EdgeTLError(
            f"{path} needs a header row path,<task 1>,<task 2>,... (the first column 'path')"
        )
    header = [c.strip() for c in rows[0]]
    tasks = header[1:]
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise EdgeTLError(f"{path}: the header names a task twice or leaves one empty")
    if len(rows) < 2:
        raise EdgeTLError(f"{path} has a header and no rows; add one row per image")
    root = path.parent
    files, values = [], []
    for n, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row]
        if len(cells) != len(header):
            raise EdgeTLError(
                f"{path} line {n} has {len(cells)} field(s), the header {len(header)}; "
                "write path and one class per task on every line"
            )
        empty = [t for t, c in zip(header, cells, strict=True) if not c]
        if empty:
            raise EdgeTLError(f"{path} line {n}: {empty[0]} is empty; fill it or drop the line")
        file = root / cells[0]
        if not file.is_file() or not is_image_name(file):
            raise EdgeTLError(
                f"{path} line {n}: {cells[0]} is not an image file under {root}; fix the "
                "path (relative to the CSV's folder) or drop the line"
            )
        files.append(str(file))
        values.append(cells[1:])
    kept, skipped = check_images(files, skip_bad)
    keep = set(kept)
    values = [v for f, v in zip(files, values, strict=True) if f in keep]
    columns = {
        t: _encode([v[i] for v in values], f"classes of column {t!r} in {path}")
        for i, t in enumerate(tasks)
    }
    return path.stem, kept, columns, skipped


def _folder_columns(
    root: Path, tasks: tuple[str, ...], skip_bad: bool
) -> tuple[str, list[str], dict, list]:
    """``root/<class of task 1>/.../<class of task N>/<image>``: one level per task."""
    leaves: list[tuple[tuple[str, ...], Path]] = []

    def walk(folder: Path, path: tuple[str, ...]) -> None:
        files, dirs = entries(folder)
        if len(path) == len(tasks):
            if dirs:
                raise EdgeTLError(
                    f"{folder} holds folders, but {len(tasks)} task(s) ({', '.join(tasks)}) "
                    f"name {len(tasks)} level(s); give one task name per folder level"
                )
            leaves.extend((path, f) for f in files)
            return
        if not dirs:
            raise EdgeTLError(
                f"{folder} is {len(path)} level(s) below {root}, but {len(tasks)} task(s) "
                f"({', '.join(tasks)}) need {len(tasks)}; lay it out as "
                f"{root}/<{'>/<'.join(tasks)}>/<image>"
            )
        for d in dirs:
            walk(d, (*path, d.name))

    walk(root, ())
    if not leaves:
        raise EdgeTLError(f"{root} has no images; add images at {len(tasks)} levels down")
    kept, skipped = check_images([f for _, f in leaves], skip_bad)
    keep = set(kept)
    labels = [p for p, f in leaves if str(f) in keep]
    columns = {
        t: _encode([p[i] for p in labels], f"level {i + 1} folders ({t}) of {root}")
        for i, t in enumerate(tasks)
    }
    return root.name, kept, columns, skipped
