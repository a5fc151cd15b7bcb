"""How a node travels to the process that runs it: pickled, with its file names.

A node is pickled with cloudpickle, which ships classes and functions defined
in the user's script (``__main__``) by value: their code travels, not a
reference to a module the other process could import. cloudpickle replaces
the file name of such code with ``"<dynamic-code>"`` (so that its bytes do
not depend on where the script is), which leaves a failing step's traceback
without the script's path or source line. :func:`pickle_node` keeps the file
name, so the node's process shows ``File "/path/to/script.py", line 42, in
step`` and, on the same machine, the line itself.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import cloudpickle

__all__ = ["pickle_node", "unpicklable_part"]

#: What cloudpickle puts in place of a shipped code object's file name.
_PLACEHOLDER = "<dynamic-code>"


class _Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, keeping the file name of the code it ships by value."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            reduce = cloudpickle.Pickler.dispatch_table.get(types.CodeType)
            if reduce is not None:
                constructor, args = reduce(obj)
                return constructor, tuple(
                    obj.co_filename if isinstance(arg, str) and arg == _PLACEHOLDER else arg
                    for arg in args
                )
        return super().reducer_override(obj)


def pickle_node(node: Any) -> bytes:
    """*node* as cloudpickle bytes (``cloudpickle.loads`` reads them back).

    Raises:
        pickle.PicklingError: something the node holds cannot be pickled.
        TypeError: likewise (a lock, an open socket: as pickle raises it).
    """
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(node)
    return buffer.getvalue()


def unpicklable_part(node: Any) -> str:
    """Which part of *node* (that :func:`pickle_node` refused) cannot be
    pickled, in words: the first attribute that cannot, or else its code."""
    for name, value in vars(node).items():
        try:
            pickle_node(value)
        except Exception:
            return f"its attribute {name!r}"
    return "what its class's code uses (a global of your script or notebook?)"
