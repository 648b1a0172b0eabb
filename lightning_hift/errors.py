"""The one exception type users catch for a bad HiFT set-up."""

from __future__ import annotations

import importlib.util

from lightning.fabric.utilities.exceptions import MisconfigurationException

_bases: tuple[type[Exception], ...] = (MisconfigurationException,)
if importlib.util.find_spec("lightning_fabric") is not None:
    # pytorch_lightning raises lightning_fabric's class of the same name; code written for it catches that one.
    from lightning_fabric.utilities.exceptions import MisconfigurationException as _StandaloneMisconfiguration

    _bases += (_StandaloneMisconfiguration,)


class HiFTConfigError(*_bases, ValueError):  # type: ignore[misc]
    """A HiFT argument, model or Trainer set-up that cannot work; the message says what to change.

    It is a ``ValueError`` and a Lightning ``MisconfigurationException`` (of both Lightning packages), so code that
    catches Lightning's configuration errors catches HiFT's too.
    """
