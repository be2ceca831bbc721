"""Shared by the fast-path tests: which operators a call ran, to check that a fast path was
taken (or stepped aside) and not only that its numbers agree."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """Records the namespace and the name (`aten.add_.Tensor`) of every operator that reaches
    the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces: set[str] = set()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))
