"""Read and write a model's parameters wherever they live: the one door for edited weights.

    W = read_param(model, "model.layers.4.mlp.down_proj.weight")     # a real tensor
    write_param(model, "model.layers.4.mlp.down_proj.weight", W + delta)

Three cases, one interface:
- an ordinary parameter (any device): read it, copy into it;
- a parameter accelerate offloads to CPU or disk (`device_map` with "cpu"/"disk" entries):
  the module's parameter sits on the `meta` device and an `AlignDevicesHook` (`module._hf_hook`)
  copies it in from `hook.weights_map` before every forward. Reading takes the value from that
  store; writing puts the new value into the store, so the next forward runs the edit.
  CPU-offloaded values live in a dict in memory and are overwritten in place. Disk-offloaded
  values are memory-mapped `.dat` files in the offload folder, or, when transformers offloads
  straight from the model's own safetensors files, entries that point into those files: an
  edit is written to a `.dat` file in the offload folder and the entry redirected there, so the
  model folder on disk is never changed.
- a parameter on another GPU than the first layer's: reads and writes stay on its device.

`onloaded(model, names)` turns offloaded parameters into ordinary ones for the length of a
block (fine-tuning needs parameters that autograd and Adam can hold on to), and `frozen`
switches gradients off for every parameter and back, by name, because the offload hooks swap
the parameter objects at each forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Where offloaded values are kept: accelerate's stores are on CPU (memory or disk).
OFFLOAD_STORE_DEVICE = torch.device("cpu")


def _split(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on `module` (a SequentialHook is opened up)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _offload_site(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """(hook, key in hook.weights_map) of an offloaded parameter, else None.

    The hook may sit on the parameter's own module or, with place_submodules, on an ancestor
    (then the key is the name relative to that ancestor).
    """
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth])) if depth else model
        for hook in _hooks(owner):
            if not getattr(hook, "offload", False) or getattr(hook, "weights_map", None) is None:
                continue
            if depth == len(parts) - 1 or getattr(hook, "place_submodules", False):
                return hook, ".".join(parts[depth:])
    return None


def _parameter(model: nn.Module, name: str) -> torch.Tensor:
    module_name, attr = _split(name)
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError as err:
        raise LookupError(f"model has no parameter {name!r} ({err})") from None
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = module._buffers.get(attr)
    if tensor is None:
        raise LookupError(f"model has no parameter {name!r}")
    return tensor


def is_offloaded(model: nn.Module, name: str) -> bool:
    """Whether accelerate keeps `name`'s value in an offload store (CPU or disk)."""
    return _offload_site(model, name) is not None


def param_device(model: nn.Module, name: str) -> torch.device:
    """The device `name`'s value is read from and written to (offloaded: the CPU store)."""
    if is_offloaded(model, name):
        return OFFLOAD_STORE_DEVICE
    return _parameter(model, name).device


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate execution device, else its first tensor's."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return OFFLOAD_STORE_DEVICE


def read_param(model: nn.Module, name: str) -> torch.Tensor:
    """The current value of parameter `name` as a real (non-meta) tensor, without gradient.

    It may share memory with the weight itself: clone it before changing it.
    """
    site = _offload_site(model, name)
    if site is None:
        return _parameter(model, name).detach()
    hook, key = site
    return hook.weights_map[key].detach()


def write_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter `name` to `value` (cast to its dtype, moved to where it lives)."""
    current = _parameter(model, name)
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"write_param({name!r}): value has shape {tuple(value.shape)}, the "
                         f"parameter {tuple(current.shape)}")
    with torch.no_grad():
        site = _offload_site(model, name)
        if site is not None:
            hook, key = site
            _store_write(hook.weights_map, key, value.to(current.dtype))
        if current.device.type != "meta":
            # Ordinary parameter, or an offloaded one caught materialised (inside a forward,
            # or left so by a stopped one): the live copy must agree with the store.
            current.copy_(value.to(current.device, current.dtype))


def _store_write(weights_map: Any, key: str, value: torch.Tensor) -> None:
    """Write into accelerate's offload store, through its PrefixedDataset views."""
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset, offload_weight

    store, full_key = weights_map, key
    while isinstance(store, PrefixedDataset):
        full_key, store = store.prefix + full_key, store.dataset
    value = value.detach().to(OFFLOAD_STORE_DEVICE)
    if isinstance(store, OffloadedWeightsLoader):
        if full_key in store.state_dict:  # CPU offload: a tensor in memory
            _replace_in(store.state_dict, full_key, value)
        elif store.save_folder is not None:
            # A .dat file of ours, or an entry pointing into the model's safetensors file:
            # either way the edit goes to (and the entry now points at) a .dat file.
            offload_weight(value.contiguous(), full_key, store.save_folder, index=store.index)
        else:
            store.state_dict[full_key] = value.clone()
            if full_key not in store.all_keys:
                store.all_keys.append(full_key)
    elif isinstance(store, MutableMapping):  # cpu_offload(...) keeps a plain state dict
        _replace_in(store, full_key, value)
    else:
        raise TypeError(f"cannot write {full_key!r} into an offload store of type "
                        f"{type(store).__name__}; load the model without offloading to edit it")


def _replace_in(store: MutableMapping, key: str, value: torch.Tensor) -> None:
    old = store.get(key)
    if old is not None and old.shape == value.shape and not old.is_inference():
        # In place: the hook may remember the tensor by its data pointer (tied weights).
        old.copy_(value.to(old.dtype))
    else:
        store[key] = value.clone()


@contextmanager
def onloaded(model: nn.Module, names: Iterable[str], write_back: bool = True
             ) -> Iterator[dict[str, nn.Parameter]]:
    """Within the block the named parameters are ordinary parameters (name -> Parameter).

    Offloaded ones are materialised on their module's execution device and their hook stops
    swapping them, so autograd and an optimiser can hold the same objects across forwards.
    On exit the hooks take over again and, with `write_back`, the final values go into the
    offload store. Parameters that are not offloaded are yielded as they are.
    """
    from accelerate.utils import set_module_tensor_to_device
    from accelerate.utils.modeling import named_module_tensors

    names = list(dict.fromkeys(names))
    taken: list[tuple[Any, nn.Module, list[str]]] = []  # (hook, its module, materialised)
    try:
        for name in names:
            site = _offload_site(model, name)
            if site is None or not site[0].offload:
                continue
            hook, key = site
            owner_name = name[: len(name) - len(key)].rstrip(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            # The hook swaps every tensor it manages or none: materialise them all.
            tensors = [n for n, _ in named_module_tensors(
                owner, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                remove_non_persistent=True)]
            for tensor_name in tensors:
                set_module_tensor_to_device(owner, tensor_name, hook.execution_device,
                                            value=hook.weights_map[tensor_name].clone())
            hook.offload = False
            taken.append((hook, owner, tensors))
        yield {name: _parameter(model, name) for name in names}
    finally:
        from accelerate.utils import set_module_tensor_to_device

        for hook, owner, tensors in taken:
            hook.offload = True
            prefix = next(n for n, m in model.named_modules() if m is owner)
            for tensor_name in tensors:
                full = f"{prefix}.{tensor_name}" if prefix else tensor_name
                if write_back and full in names:
                    _store_write(hook.weights_map, tensor_name,
                                 _parameter(model, full).detach())
                set_module_tensor_to_device(owner, tensor_name, "meta")


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of `model` requires a gradient inside the block; flags restored by name.

    By name, because offload hooks replace a module's parameter objects at every forward:
    restoring the objects seen on entry would leave the live ones frozen.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for name, flag in flags.items():
            live = _parameter(model, name)
            if live.requires_grad != flag:
                # An offloaded module's meta placeholder set during an inference-mode forward
                # is an inference tensor, whose flag can only be changed in inference mode.
                with torch.inference_mode(live.is_inference()):
                    live.requires_grad_(flag)
