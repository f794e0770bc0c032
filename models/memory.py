"""What autograd saves for a backward, tallied as it is saved: the memory ledgers' activations
(grpo/memory.py, dev/sft_step.py)."""

from __future__ import annotations


class SavedTally:
    """Bytes autograd saves for the backward, per innermost module class (each storage counted once,
    parameters never): a saved-tensor hook, and global module hooks that keep a stack of the modules
    whose forward is running."""

    def __init__(self, model: object) -> None:
        import collections

        self.bytes: collections.Counter = collections.Counter()
        self.seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.held: list[object] = []
        self.stack: list[str] = []

    def __enter__(self) -> SavedTally:
        import torch

        def enter(module: object, inputs: object) -> None:
            self.stack.append(type(module).__name__)

        def leave(module: object, inputs: object, output: object) -> None:  # returns None: the output stays
            self.stack.pop()

        self.hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                      torch.nn.modules.module.register_module_forward_hook(leave)]
        self.saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.saved.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.saved.__exit__(*exc)
        for h in self.hooks:
            h.remove()
        self.held = []

    def _pack(self, t: object) -> object:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            # held until the tally ends: a storage freed early (a branch of the graph dropped before the
            # backward) would otherwise hand its address to a later one, which would go uncounted
            self.held.append(storage)
            self.bytes[self.stack[-1] if self.stack else "loss"] += storage.nbytes()
        return t
