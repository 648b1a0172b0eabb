"""A griffe extension for the API reference: a class whose docstring is composed when its module is imported (the
strategies list every argument from :mod:`lightning_hift.settings`) is documented by the docstring it has at run
time; everything else is read from the source, where attribute docstrings live."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe


class RuntimeDocstrings(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        try:
            live = getattr(importlib.import_module(cls.module.path), cls.name)
        except (ImportError, AttributeError):
            return
        text = inspect.cleandoc(live.__doc__ or "")
        if text and (cls.docstring is None or cls.docstring.value != text):
            cls.docstring = griffe.Docstring(text, parent=cls)
