"""Short, safe reprs of user values for one-line error messages.

Values come from files a user (or a damaged disk) controls: a 10 MB string in a config or a cache
manifest must not become a 10 MB error message, and a huge container must not be rendered in full
only to be cut afterwards. `bounded_repr` never prints more than `limit` characters of a value.
"""

from __future__ import annotations

import reprlib

LIMIT = 80
"""Characters of a user value an error message prints at most."""

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = LIMIT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def bounded_repr(value, limit: int = LIMIT) -> str:
    """``repr(value)`` cut to at most `limit` characters (ending in ``...`` when cut); containers are
    abbreviated while rendering (reprlib), so the cost does not grow with the value's size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of {value.bit_length()} bits>"  # str() of it would even fail past 4300 digits
    try:
        text = _REPR.repr(value)
    except Exception:  # a broken __repr__ of a user object: say what it is instead
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
