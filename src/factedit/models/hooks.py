"""Activation capture and editing as context managers (baukit's nethook, normalised once).

    with Trace(model, "model.layers.12.mlp.down_proj", retain_input=True, stop=True) as t:
        model(**batch)
    keys = t.input            # (B, T, d_ff)

    with TraceDict(model, names, edit_output=add_delta): ...   # fn(output, name) -> output

Hooks are removed in `__exit__`, so an exception cannot leave a model instrumented. Module
outputs that are tuples (older transformers blocks) are unwrapped here, so method code never
writes `output[0]`; edit functions always receive and return the hidden-state tensor.

`start_at_layer` runs a forward pass from a given block with given hidden states: earlier
blocks become pass-throughs. This is how target-value optimisation avoids recomputing the
layers below the edit at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class StopForward(Exception):
    """Raised after a traced module with stop=True; swallowed by the Trace context."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted `name`; LookupError names what is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise LookupError(f"model has no module {name!r} ({err})") from None


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    return tensor


class Trace(contextlib.AbstractContextManager):
    """Capture (and optionally edit) one module's input and output during forward passes.

    Args:
        retain_input: keep the module's first positional input as `.input`.
        retain_output: keep its (first) output as `.output`.
        detach: detach retained tensors (default True: capture is for reading).
        edit_output: fn(output, name) -> output applied to the module output.
        edit_input: fn(input, name) -> input applied to the first positional input before
            the module runs (KN scales the MLP's intermediate activations this way);
            `.input` then holds the edited input.
        stop: raise StopForward after this module, ending the forward pass early.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        retain_input: bool = False,
        retain_output: bool = False,
        detach: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        edit_input: EditFn | None = None,
    ) -> None:
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        module = get_module(model, name)

        def pre_hook(_module: nn.Module, inputs: tuple, kwargs: dict) -> Any:
            # A pre-hook, so the input is kept even if a module inside this one stops the
            # pass; blocks may receive hidden_states as a keyword.
            x = inputs[0] if inputs else kwargs.get("hidden_states")
            changed = None
            if edit_input is not None and x is not None:
                x = edit_input(x, name)
                if inputs:
                    changed = ((x, *inputs[1:]), kwargs)
                else:
                    changed = (inputs, {**kwargs, "hidden_states": x})
            if retain_input:
                self.input = x.detach() if (detach and x is not None) else x
            return changed

        def hook(_module: nn.Module, inputs: tuple, output: Any) -> Any:
            new_output = output
            if edit_output is not None:
                new_output = _replace_first(output, edit_output(_first_tensor(output), name))
            if retain_output:
                y = _first_tensor(new_output)
                self.output = y.detach() if detach else y
            if stop:
                raise StopForward()
            return new_output

        self._handles = [module.register_forward_hook(hook)]
        if retain_input or edit_input is not None:
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._stop = stop

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return self._stop and exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(dict, contextlib.AbstractContextManager):
    """Several Traces at once: `ret[name].input` / `.output`. `stop` stops after the last."""

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        retain_input: bool = False,
        retain_output: bool = False,
        detach: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(names))
        self._stop = stop
        for i, name in enumerate(names):
            self[name] = Trace(
                model,
                name,
                retain_input=retain_input,
                retain_output=retain_output,
                detach=detach,
                edit_output=edit_output,
                stop=stop and i == len(names) - 1,
            )

    def __exit__(self, exc_type, exc, tb) -> bool:
        for trace in reversed(list(self.values())):
            trace.close()
        return self._stop and exc_type is not None and issubclass(exc_type, StopForward)


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its hidden states untouched."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        return (hidden_states,) if self.returns_tuple else hidden_states


@contextlib.contextmanager
def start_at_layer(
    layers: nn.ModuleList, start: int, hidden: torch.Tensor, returns_tuple: bool = False
) -> Iterator[None]:
    """Within the context, a forward pass feeds `hidden` (B, T, d) into block `start`.

    Blocks 0..start-1 are swapped for pass-throughs, so their cost disappears; embeddings,
    masks and rotary tables are still built by the model's own forward, which keeps this
    exact for every architecture in the table (the injected tensor replaces the block input).
    """
    originals = [layers[i] for i in range(start)]

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = hidden
        return args, kwargs

    handle = layers[start].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(start):
            layers[i] = _PassThrough(returns_tuple)
        yield
    finally:
        for i, module in enumerate(originals):
            layers[i] = module
        handle.remove()
