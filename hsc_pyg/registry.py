"""One resolver for every family of things chosen by name: layers, edge builders, heads, backbones.

A :class:`Registry` maps a name to a class (or function) and the capabilities it declares, the way PyG's
``torch_geometric.nn.resolver`` maps ``"relu"`` to ``ReLU``. Every family resolves through the same method, so an
unknown name gives the same one-line :class:`~hsc_pyg.errors.ConfigError` everywhere::

    EDGE_BUILDERS = Registry("edge builder")

    @EDGE_BUILDERS.register("knn", takes_k=True, needs_x=True)
    def knn_edges(num_nodes, x, pos, k): ...

    EDGE_BUILDERS.get("knm")                       # ConfigError: unknown edge builder 'knm'; choose one of full, knn, ...
    EDGE_BUILDERS.capability("knn", "needs_x")     # True

A capability not given to :meth:`Registry.register` is read from the entry's attribute of that name, so a class can
declare it as PyG's convolutions do (``supports_edge_attr = True`` in the class body).

:meth:`Registry.build` also checks keyword arguments against the constructor's signature: an argument the entry
cannot take is a ConfigError naming the entry and the arguments it accepts (never silently ignored).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry (a class or a function) with declared capabilities.

    Args:
        kind: what the family is called in messages ("layer", "edge builder", "head", "backbone").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._capabilities: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **capabilities: Any) -> Callable[[T], T]:
        """Decorator: register the decorated entry under ``name`` with ``capabilities`` (read by :meth:`capability`).

        A class entry also gets ``registry_name`` set to ``name``.
        """

        def wrap(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            self._capabilities[name] = dict(capabilities)
            if inspect.isclass(entry):
                entry.registry_name = name
            return entry

        return wrap

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests register temporary entries)."""
        self._entries.pop(name)
        self._capabilities.pop(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; ConfigError naming the valid choices otherwise."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._entries[name]

    __getitem__ = get

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]

    def capability(self, name: str, key: str, default: Any = None) -> Any:
        """Capability ``key`` of ``name``: given when registering, else the entry's attribute, else ``default``."""
        entry = self.get(name)
        declared = self._capabilities[name]
        return declared[key] if key in declared else getattr(entry, key, default)

    def accepted_arguments(self, name: str, skip: int = 0) -> list[str]:
        """Keyword arguments the entry's constructor (or function) takes, after its first ``skip`` positional ones."""
        entry = self.get(name)
        params = list(inspect.signature(entry).parameters.values())[skip:]
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def check_arguments(self, name: str, arguments: dict[str, Any], skip: int = 0) -> None:
        """ConfigError unless every key of ``arguments`` is an argument the entry takes."""
        accepted = self.accepted_arguments(name, skip)
        extra = sorted(set(arguments) - set(accepted))
        if extra:
            takes = ", ".join(accepted) if accepted else "no arguments"
            raise ConfigError(f"{self.kind} {name!r} cannot take {', '.join(extra)}; it accepts {takes}")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``entry(*args, **kwargs)`` after :meth:`check_arguments` (``args`` are the family's fixed positionals)."""
        self.check_arguments(name, kwargs, skip=len(args))
        return self.get(name)(*args, **kwargs)
