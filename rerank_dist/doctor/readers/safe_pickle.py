"""Read the fields of a pickled ``TrainingArguments`` (``training_args.bin``) without running its code.

``Trainer`` saves its arguments with ``torch.save``: a pickle (inside a zip archive since torch 1.6)
whose classes a plain unpickler would import and call. Loading an untrusted run's file that way
executes whatever it names. Here every class the pickle names is replaced by an inert stand-in
that only records its constructor arguments and state, so nothing from the file is imported or
run; the arguments come back as a plain dict (enums as their values).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

# Pure containers that are safe to build for real.
_SAFE = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "list"), ("builtins", "dict"),
         ("builtins", "tuple"), ("builtins", "object"), ("collections", "OrderedDict")}


class _Inert:
    """Stand-in for any class the pickle names: keeps what it was given, does nothing."""

    _stub_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def value(self) -> Any:
        """The plain value this stands for: an enum's value, an object's state."""
        state = getattr(self, "_state", None)
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]} if isinstance(state[0], dict) else state[1]
        if isinstance(state, dict):
            return {k: _plain(v) for k, v in state.items()}
        args = getattr(self, "_args", ())
        if len(args) == 1:
            return _plain(args[0])
        return f"<{self._stub_name}>"


def _plain(value: Any) -> Any:
    if isinstance(value, _Inert):
        return value.value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg._reconstructor(cls, object, None) is how default __reduce_ex__ rebuilds a plain object.
    return cls.__new__(cls) if isinstance(cls, type) and issubclass(cls, _Inert) else _Inert()


class _Unpickler(pickle.Unpickler):
    _stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (_Inert,), {"_stub_name": f"{module}.{name}"})
        return self._stubs[key]

    def persistent_load(self, pid: Any) -> None:  # tensors stored beside the pickle: not needed here
        return None


def read_training_args(path: Path) -> dict[str, Any]:
    """The fields of a saved TrainingArguments (or TRL SFTConfig), as a plain dict."""
    raw = Path(path).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError(f"{path}: a zip archive without data.pkl")
            raw = archive.read(names[0])
    obj = _Unpickler(io.BytesIO(raw)).load()
    value = _plain(obj)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds no argument fields")
    return value
