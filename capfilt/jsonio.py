"""JSON that every reader takes. Python writes an undefined metric (ROC-AUC when the labels hold one
class, precision when nothing was dropped) as ``NaN``, which is not JSON: ``jq``, JavaScript and most
other parsers refuse the whole file. Written here, NaN and infinities are ``null``."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``finite(obj)``; raises rather than write a non-finite number that got past it."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
