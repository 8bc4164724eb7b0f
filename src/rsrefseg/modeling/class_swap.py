"""Switching modules to a faster subclass in place and back (parameters, names and hooks untouched)."""

from __future__ import annotations

from torch import nn


def swap_classes(model: nn.Module, original: type, fast: type, attr: str) -> int:
    """Give every module of exactly class ``original`` in ``model`` the class ``fast`` (a subclass),
    remembering the original in ``module.__dict__[attr]``; returns how many modules are ``fast`` now."""
    count = 0
    for module in model.modules():
        if type(module) is original:
            module.__dict__[attr] = original
            module.__class__ = fast
        count += isinstance(module, fast)
    return count


def restore_classes(model: nn.Module, attr: str, drop: tuple[str, ...] = ()) -> int:
    """Undo :func:`swap_classes` (and remove the ``drop`` attributes, e.g. caches); returns how many."""
    count = 0
    for module in model.modules():
        original = module.__dict__.pop(attr, None)
        for name in drop:
            module.__dict__.pop(name, None)
        if original is not None:
            module.__class__ = original
            count += 1
    return count
