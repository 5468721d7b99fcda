"""Registries: the extension points (camera sources, robot drivers, engine backends,
smoothing policies) as name -> object tables filled by a decorator, not string if-chains.

A new kind is one module that decorates its builder (``@CAMERAS.register("mykind")``),
plus its registration: a line in the registry's ``builtins`` (name -> module, imported
the first time the name is asked for, so optional libraries stay unimported until used),
or an import of the module before the name is looked up (tests and user code do this).

Standard library only (the robot side and ``vpp --help`` import it).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from vpp_edge.config_schema import closest
from vpp_edge.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``what`` names it in errors); see the module docstring."""

    def __init__(self, what: str, builtins: Mapping[str, str] | None = None):
        self.what = what
        self._builtins = dict(builtins or {})  # name -> module that registers it when imported
        self._entries: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator: ``name`` is ``obj`` from now on; ``info`` is kept beside it (:meth:`info`).
        Registering a different object under a taken name is refused (two modules claiming
        one name is a bug); the same object again is a no-op (a module imported twice)."""

        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                old = self._entries[name]
                same = (getattr(old, "__module__", 1), getattr(old, "__qualname__", 1)) == \
                    (getattr(obj, "__module__", 2), getattr(obj, "__qualname__", 2))
                if not same:  # a reloaded module re-registers its own builder; anything else is a clash
                    raise ValueError(f"{self.what} '{name}' is registered already ({self._entries[name]!r})")
            self._entries[name] = obj
            self._info[name] = dict(info)
            return obj

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register an example clean up after themselves)."""
        self._entries.pop(name, None)
        self._info.pop(name, None)

    def _load(self, name: str) -> None:
        if name not in self._entries and name in self._builtins:
            import_module(self._builtins[name])

    def get(self, name: str) -> T:
        """The entry for ``name``; :class:`~vpp_edge.errors.ConfigError` naming the closest
        known name and all of them otherwise."""
        self._load(name)
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries[name]

    def require(self, name: str) -> str:
        """``name`` when it is known (built in or registered), checked without importing its
        module (a config is checked where that module's SDK is absent); the error of :meth:`get`
        otherwise."""
        if name not in self:
            raise self._unknown(name)
        return name

    def _unknown(self, name: str) -> ConfigError:
        names = self.names()
        return ConfigError(f"unknown {self.what} '{name}'{closest(name, names)}; allowed: {', '.join(names)}")

    def info(self, name: str) -> dict[str, Any]:
        """What was registered beside ``name`` (``register(name, **info)``)."""
        self.get(name)
        return self._info[name]

    def names(self) -> list[str]:
        """Built-in names first (in their order), then the ones registered since."""
        return [*self._builtins, *(n for n in self._entries if n not in self._builtins)]

    def __contains__(self, name: object) -> bool:
        return name in self._builtins or name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
