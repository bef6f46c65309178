"""`module:attr` hooks: the only way a job file names code (an engine class, a scorer function). Imported in the
driver before any work, so that a typo is one clear message naming the key (exit 2)."""

from __future__ import annotations

import importlib

from batchrun.errors import SpecError


def load_hook(ref: str, key: str = "hook"):
    """The object `ref` ("package.module:attr.sub") names; SpecError naming the job-file key if it cannot load."""
    module, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"key '{key}': cannot load the hook {ref!r}: {type(e).__name__}: {e}") from None
    return obj
