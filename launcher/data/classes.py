"""``data.classes``: some of a classification dataset's classes, relabelled 0..k-1 in the
listed order (pretrain on digits 0-4, fine-tune on 5-9).

The planner counts the rows of the listed classes from the source's label counts
(``rows_of``); the loaders keep those rows (``keep_classes``). Both follow the one list,
so the rows the plan sized batches and steps for are the rows that load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from launcher.errors import UsageError


def rows_of(classes: Sequence[int], counts: Mapping[int, int], labels: str | None = None) -> int:
    """Rows of the listed ``classes``, given the rows of each label of the source (of
    the listed ones at least, when ``labels`` says which labels have rows); a listed
    class without rows is an error (a typo must not train on nothing)."""
    empty = [c for c in classes if not counts.get(c)]
    if empty:
        labels = labels or _span(sorted(label for label, count in counts.items() if count))
        raise UsageError(f"class {empty[0]} has no rows; the data's labels are {labels}", key="data.classes")
    return sum(counts[c] for c in classes)


def _span(labels: list[int]) -> str:
    contiguous = labels == list(range(labels[0], labels[-1] + 1)) if labels else False
    return f"{labels[0]}..{labels[-1]}" if contiguous else ", ".join(map(str, labels))


def keep_classes(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the positions of the rows whose label is listed, in row order; their new labels:
    the place of their old label in ``classes``)."""
    listed = np.asarray(classes, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    kept = np.flatnonzero(np.isin(labels, listed))
    order = np.argsort(listed)
    new_labels = order[np.searchsorted(listed[order], labels[kept])]
    return kept, new_labels.astype(np.int64)
