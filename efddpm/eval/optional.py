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
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"{what} needs {package}, which is not installed ({e.msg}); install the evaluation "
                         f"extra: {EXTRA}") from None
    except Exception as e:            # installed but broken, e.g. by a torchvision built for another torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{what} needs {package}, which fails to import ({type(e).__name__}: {first}); "
                         "check that it (and torchvision, which it imports when installed) matches the installed "
                         "torch") from None
