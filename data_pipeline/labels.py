"""Class labels for fine-tuning (task=classify): what a sample's .json must
hold, and the reasons a sample is skipped when it does not.

A label is read from the .json under `data.label_key`:

    single-label   an integer class index in [0, num_classes), or a class
                   name listed in `classes`
    multi-label    a list of such indices or names (possibly empty: no class)

Where the .json has no label key but names its class under
`data.class_key`, that name is looked up in `classes`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class LabelError(Exception):
    """A sample whose label cannot be used; `reason` is the skip counter's name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class LabelSpec:
    num_classes: int
    classes: tuple[str, ...] = field(default_factory=tuple)  # names by index, or empty
    multi_label: bool = False

    def __post_init__(self):
        if self.num_classes < 1 and not self.classes:
            raise ValueError("a classifier needs task.num_classes or a task.classes list")
        if self.classes and self.num_classes and len(self.classes) != self.num_classes:
            raise ValueError(f"task.classes names {len(self.classes)} classes but task.num_classes={self.num_classes}")
        if self.classes and len(set(self.classes)) != len(self.classes):
            raise ValueError("task.classes lists a class name twice")
        if not self.num_classes:
            object.__setattr__(self, "num_classes", len(self.classes))
        if not self.multi_label and self.num_classes < 2:
            raise ValueError("a single-label classifier needs at least 2 classes")

    def index(self, value) -> int:
        """One label value (an index or a class name) -> its class index."""
        if isinstance(value, bool):
            raise LabelError("bad_label", f"{value!r} is not a class")
        if isinstance(value, int):
            if not 0 <= value < self.num_classes:
                raise LabelError("label_out_of_range", f"{value} not in [0, {self.num_classes})")
            return value
        if isinstance(value, str):
            if not self.classes:
                raise LabelError("unknown_class", f"{value[:80]!r}: class names need task.classes")
            try:
                return self.classes.index(value.strip())
            except ValueError:
                raise LabelError("unknown_class", repr(value[:80])) from None
        raise LabelError("bad_label", f"{type(value).__name__} is not a class index or name")

    def read(self, raw: bytes | None, *, label_key: str, class_key: str) -> int | list[int]:
        """The label of a sample's .json: a class index, or (multi-label) a sorted list of them."""
        if raw is None:
            raise LabelError("missing_label", "the sample has no .json")
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LabelError("bad_json", str(e)[:200]) from None
        if not isinstance(meta, dict):
            raise LabelError("missing_label", "the .json is not an object")
        if label_key and label_key in meta:
            value = meta[label_key]
        elif class_key and class_key in meta and self.classes:
            value = meta[class_key]
        else:
            raise LabelError("missing_label", f"no {label_key!r} in the .json")
        if self.multi_label:
            values = value if isinstance(value, list) else [value]
            if len(values) > self.num_classes:
                raise LabelError("bad_label", f"{len(values)} labels for {self.num_classes} classes")
            return sorted({self.index(v) for v in values})
        if isinstance(value, list):
            raise LabelError("bad_label", "a list of labels, but task.multi_label=false")
        return self.index(value)

    def name(self, index: int) -> str:
        return self.classes[index] if self.classes else str(index)
