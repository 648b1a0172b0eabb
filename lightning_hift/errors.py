"""The one exception type users catch for a bad HiFT set-up."""

from __future__ import annotations


class HiFTConfigError(ValueError):
    """A HiFT argument, model or Trainer set-up that cannot work; the message says what to change."""
