"""Serving checks of a bundle SPEC at build time: what the device would otherwise find only at install or
in its answers (a post-processing output the models lack, labels that do not match the class count).

Pure: the validated manifest body and the models' golden outputs in, None or the problem in words out
(the builder raises it as a SpecError).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from edge_agent.bundle.manifest import ManifestBody


def class_count(kind: str, item: np.ndarray) -> Optional[int]:
    """Classes in one item's output: all its values (classification), or the class columns of a
    YOLO-style detection output ((boxes, 5 + C) rows, or (4 + C, boxes) columns); None when the shape
    is neither."""
    a = np.asarray(item)
    if kind == "classification":
        return int(a.size)
    a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
    if a.ndim != 2:
        return None
    if 5 <= a.shape[0] < a.shape[1]:
        return int(a.shape[0] - 4)
    return int(a.shape[1] - 5)


def postprocessing_problem(body: ManifestBody, golden_outputs: Mapping[str, Mapping[str, np.ndarray]]
                           ) -> Optional[str]:
    """`postprocessing.output` must name an output of both models, and `labels` (when given) must have
    one entry per class of that output, as the golden run shows it."""
    post = body.postprocessing
    for mname in ("small", "large"):
        names = [o.name for o in body.models[mname].outputs]
        if post.output is not None and post.output not in names:
            return ("postprocessing.output %r is not an output of the %s model (it has %s)"
                    % (post.output, mname, ", ".join(names)))
        if post.kind == "raw" or post.labels is None:
            continue
        name = post.output or names[0]
        values: Dict[str, np.ndarray] = dict(golden_outputs[mname])
        n = class_count(post.kind, values[name][0])
        if n is None:
            return "the %s model's output %r of shape %s is not a detection output" % (
                mname, name, tuple(values[name].shape))
        if len(post.labels) != n:
            return ("postprocessing.labels has %d labels but the %s model's output %r has %d classes"
                    % (len(post.labels), mname, name, n))
    return None
