"""Name -> class or function tables that other code can extend, as MONAI's ``FLEXUNET_BACKBONE.register_class``:
the encoders, the 2D segmentation networks per encoder, the QAP solvers and the inter-slice attentions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict):
    """A dict of named components with :meth:`register` (call or decorator) and :meth:`get_or_raise` (an error
    that lists the valid names). Why not MONAI's ``ComponentStore``: its entries are wrapped with descriptions
    and are read as attributes, while configs and the code here index by name like a dict."""

    def __init__(self, kind: str, items: Mapping[str, Any] | None = None) -> None:
        super().__init__(items or {})
        self.kind = kind

    def register(self, name: str, obj: T | None = None, overwrite: bool = False) -> T | Callable[[T], T]:
        """``REG.register("name", obj)``, or ``@REG.register("name")`` on a class or function. A taken name is
        refused unless ``overwrite``."""
        def add(item: T) -> T:
            if name in self and self[name] is not item and not overwrite:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]!r}); pass overwrite=True "
                                 "to replace it")
            self[name] = item
            return item

        return add if obj is None else add(obj)

    def get_or_raise(self, name: str) -> Any:
        """The component ``name``; a ValueError listing the valid names when there is none."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {sorted(self)}")
        return self[name]
