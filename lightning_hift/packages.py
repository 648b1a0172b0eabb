"""The two Lightning packages: ``lightning.pytorch`` and the older ``pytorch_lightning``.

They are separate class trees with the same code. HiFT's mechanism is written once, as mixins that name no
Lightning class at run time; :mod:`lightning_hift.pytorch` and :mod:`lightning_hift.pytorch_lightning` bind
it to each package's ``Strategy`` and ``Callback``. Where the mechanism must recognise a Lightning object (a
precision plugin, a callback), it asks this module for the class of that name in every package in use.
"""

from __future__ import annotations

import sys

PACKAGES: tuple[str, ...] = ("lightning.pytorch", "pytorch_lightning")


def lightning_classes(path: str) -> tuple[type, ...]:
    """The class at ``path`` (e.g. ``"plugins.precision.HalfPrecision"``) in each Lightning package imported so far.

    A package that is not imported cannot have made the object being checked, so it is not imported here.
    """
    found: list[type] = []
    for name in PACKAGES:
        package = sys.modules.get(name)
        if package is None:
            continue
        found_class: object = package
        for name in path.split("."):
            found_class = getattr(found_class, name, None)
        if isinstance(found_class, type):  # None where this version of the package has no such name
            found.append(found_class)
    return tuple(found)
