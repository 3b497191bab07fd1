"""Typed keys for what plugins share: ``AgentContext.extras`` and ``UserState.extras``.

A key is an object, not a string (as aiohttp's ``AppKey``): two plugins cannot collide on a name
by accident, and a type checker knows what a key holds. The keys that several plugins read are
declared here; a plugin's own keys live with the plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

if TYPE_CHECKING:
    from agent.vectors.item_vectors import ItemVectors

T = TypeVar("T")
D = TypeVar("D")


class Key(Generic[T]):
    """A typed key; ``name`` is for people (repr, errors), identity is what counts."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Key({self.name!r})"


class Extras(dict[Key[Any], Any]):
    """A dict whose keys must be :class:`Key` objects; reads are typed by the key."""

    __slots__ = ()

    def __setitem__(self, key: Key[T], value: T) -> None:
        if not isinstance(key, Key):
            raise TypeError(f"extras take a Key, not {type(key).__name__} {key!r}: declare one with Key(name)")
        super().__setitem__(key, value)

    def __getitem__(self, key: Key[T]) -> T:
        return super().__getitem__(key)  # type: ignore[no-any-return]

    @overload
    def get(self, key: Key[T], default: None = None) -> T | None: ...
    @overload
    def get(self, key: Key[T], default: D) -> T | D: ...
    def get(self, key: Key[T], default: Any = None) -> Any:
        return super().get(key, default)

    def setdefault(self, key: Key[T], default: T) -> T:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]


# shared by the content source (writer), the diversity reranker and the tests (readers)
ITEM_VECTORS: Key[ItemVectors] = Key("item_vectors")
# the fusion's learned weights by segment, reported by the replay
FUSION_WEIGHTS: Key[dict[str, dict[str, float]]] = Key("fusion_weights")
# a user's interest profile, written by the summariser, read by the content source and pushes
PROFILE: Key[dict[str, Any]] = Key("profile")
