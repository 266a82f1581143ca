"""The optional libraries of the evaluation, imported when a metric first needs them.

`import efddpm` and `import efddpm.eval` import neither torchmetrics nor transformers: efddpm's runtime does not
depend on them. A metric asks for its library here, and where it is not installed the user reads one line naming
the extra that brings it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from efddpm.core.checks import InputError

EXTRA = 'pip install "efddpm[eval]"'


def require(module: str, what: str) -> ModuleType:
    """The module `module` (e.g. "torchmetrics.functional.image"), or InputError saying `what` needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise InputError(f"{what} needs {package}, which is not installed ({e.msg}); install the evaluation "
                         f"extra: {EXTRA}") from None
