"""A module handle that imports on first use: how `medtune.commands` names the rooms it calls.

Every command module names what it calls at its top, so the arrows are in plain sight, but through `lazy(...)`:
the module is found at once (a typo fails at import time) and imported when a handler first reads one of its
names. `medtune --help` and a recipe mistake therefore answer in ~1 s instead of the ~15 s it takes to import
torch, transformers and peft for every command (measured on 2 shared cores: 15-19 s with plain imports).

Why not the standard library's `importlib.util.LazyLoader`: it puts a half-made module into `sys.modules`, and
anything that walks `sys.modules` (`inspect.getmodule` does, e.g. inside torch's import) then executes it in the
middle of another module's import, which broke medtune.eval's import order (tried: ImportError from eval.probes).
This handle stays out of `sys.modules`; the real module is imported the normal way.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any


class LazyModule:
    """Reads attributes from `name`'s module, imported on the first read. Attributes set on the handle itself
    (e.g. a test's monkeypatch) are read first."""

    def __init__(self, name: str):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        self._name = name

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self._name)  # after the first call, a dictionary lookup in sys.modules

    def __getattr__(self, attr: str) -> Any:  # only for names not set on the handle
        return getattr(self.module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> LazyModule:
    """A handle on `name`'s module that imports it when one of its attributes is first read."""
    return LazyModule(name)
