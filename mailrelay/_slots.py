"""Filling a slotted attrs value directly: for hot paths that build many known-good values.

Private to the package. attrs' ``__init__`` runs each field's validators and converters;
where a caller has already checked the values (a reply the reader parsed, a result built
from replies, a record made from stored rows), it may create the instance with
:data:`new_instance` and fill each slot through its member descriptor, as attrs' own
``__init__`` does for frozen classes (it too bypasses ``__setattr__``).

Rules this module keeps:

* :func:`slot_setters` checks, when it is called (at import of the module that uses it),
  that the class's fields are exactly the names given, in order: a field added to a value
  class fails loudly instead of being left unset by a fast builder.
* Every fast builder has a test holding it equal to the class's own constructor.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

__all__ = ["new_instance", "slot_setters"]

#: Creates an instance without running ``__init__`` (every slot must then be filled).
new_instance = object.__new__


def slot_setters(cls: type, names: tuple[str, ...]) -> list[Callable[[object, object], None]]:
    """The setters of ``cls``'s slots, in the order of ``names``.

    Raises:
        AssertionError: ``names`` is not exactly ``cls``'s attrs fields, in order.
    """
    if tuple(field.name for field in attrs.fields(cls)) != names:
        raise AssertionError(f"{cls.__name__}'s fields changed: update its fast builder")
    return [cls.__dict__[name].__set__ for name in names]
