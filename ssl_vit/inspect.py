"""Looking inside a backbone: attention maps (`Recorder`) and intermediate embeddings (`Extractor`).

Both wrap a model, run it, and hand back `(output, recordings)` like the seed collection's
wrappers of the same names; `eject()` removes every hook and returns the model untouched.

`Recorder` works on any backbone built on `ssl_vit.layers.AttentionBase`: while the wrapper runs,
each attention module takes the explicit-softmax path and keeps its post-softmax weights, so the
fused kernel is used again as soon as the recording ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import UnknownNameError, closest
from .layers import AttentionBase

__all__ = ["Recorder", "Extractor"]


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """Apply `fn` to every tensor inside tuples, lists, dicts and dataclass-like objects."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(fn, v) for v in value)
    if isinstance(value, list):
        return [_map_tensors(fn, v) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):  # e.g. BackboneOutput
        return type(value)(**{k: _map_tensors(fn, getattr(value, k)) for k in value.__dataclass_fields__})
    return value


def group_attention(maps: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor] | None:
    """Stack per-layer maps, each (B, H, N, M), in the order the layers ran.

    All of one shape (isotropic models): one tensor (B, layers, H, N, M). Otherwise (hierarchical
    models, whose stages differ in tokens or heads; multi-branch models): a list with one stacked
    tensor (B, layers_in_group, H, N, M) per run of consecutive layers with equal shapes.
    """
    if not maps:
        return None
    groups: list[list[torch.Tensor]] = [[maps[0]]]
    for m in maps[1:]:
        if m.shape == groups[-1][-1].shape:
            groups[-1].append(m)
        else:
            groups.append([m])
    stacked = [torch.stack(g, dim=1) for g in groups]
    return stacked[0] if len(stacked) == 1 else stacked


class Recorder(nn.Module):
    """Attention weights of every attention layer: `preds, attns = Recorder(model)(img)`.

    attns: (B, layers, heads, N, N) for isotropic models (N counts prefix tokens, class token
    first), or a list of such tensors, one per stage, for hierarchical ones (see
    `group_attention`); None when the model has no `AttentionBase` module. Window attention
    reports (B * windows, heads, n, n) per layer. `device` moves the maps there (default: the
    input's device).
    """

    def __init__(self, vit: nn.Module, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.vit = vit
        self.device = device
        self.recordings: list[torch.Tensor] = []
        self.ejected = False
        self._active = False
        self._modules_seen = [m for m in vit.modules() if isinstance(m, AttentionBase)]
        self.hooks = [m.register_forward_hook(self._hook) for m in self._modules_seen]

    def _hook(self, module: AttentionBase, _inputs: Any, _output: Any) -> None:
        # A hook, not a read of `last_attention` afterwards, so a module called twice in one
        # forward (shared weights, two branches) is recorded twice, in execution order.
        if self._active and module.last_attention is not None:
            self.recordings.append(module.last_attention)
            module.last_attention = None

    def clear(self) -> None:
        self.recordings.clear()

    def eject(self) -> nn.Module:
        """Remove the hooks and return the wrapped model, unchanged."""
        self.ejected = True
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        for m in self._modules_seen:
            m.record, m.last_attention = False, None
        return self.vit

    def forward(self, img: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, torch.Tensor | list | None]:
        if self.ejected:
            raise RuntimeError("this Recorder has been ejected (eject() returned the model); wrap the model again")
        self.clear()
        previous = [m.record for m in self._modules_seen]
        for m in self._modules_seen:
            m.record = True
        self._active = True
        try:
            pred = self.vit(img, *args, **kwargs)
        finally:
            self._active = False
            for m, was in zip(self._modules_seen, previous):
                m.record = was
        target = self.device if self.device is not None else img.device
        attns = group_attention([r.to(target) for r in self.recordings])
        self.clear()
        return pred, attns


class Extractor(nn.Module):
    """Output (or input) of a named layer: `logits, embeddings = Extractor(model)(img)`.

    layer_name: an attribute or dotted module path (`'transformer'`, `'transformer.blocks.3'`,
    `'multi_scale_encoder'`), or a list of them, in which case `embeddings` is a dict by name.
    layer: a module to hook instead of a name. For a ViT the default `'transformer'` gives the
    tokens (B, 1 + N, D) before the final norm, class token first. Tuples (CrossViT's two scales)
    come back as tuples.
    """

    def __init__(
        self,
        vit: nn.Module,
        device: torch.device | str | None = None,
        layer: nn.Module | None = None,
        layer_name: str | Sequence[str] = "transformer",
        layer_save_input: bool = False,
        return_embeddings_only: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.device = device
        self.layer_save_input = layer_save_input
        self.return_embeddings_only = return_embeddings_only
        self.detach = detach
        self.ejected = False
        self._many = layer is None and not isinstance(layer_name, str)
        if layer is not None:
            targets = {"layer": layer}
        else:
            names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
            targets = {name: self._find(name) for name in names}
        self.latents: dict[str, Any] = {}
        self.hooks = [module.register_forward_hook(self._make_hook(name)) for name, module in targets.items()]

    def _find(self, name: str) -> nn.Module:
        try:
            module = self.vit.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Module):
            names = [n for n, _ in self.vit.named_modules() if n]
            hint = closest(name, names)
            raise UnknownNameError(
                f"{type(self.vit).__name__} has no layer '{name}'"
                + (f"; did you mean: {', '.join(hint)}?" if hint else "")
                + " (model.named_modules() lists the names)"
            )
        return module

    def _make_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
            value = inputs if self.layer_save_input else output
            if self.layer_save_input and isinstance(value, tuple) and len(value) == 1:
                value = value[0]
            self.latents[name] = _map_tensors(lambda t: t.detach().clone() if self.detach else t, value)
        return hook

    def clear(self) -> None:
        self.latents = {}

    def eject(self) -> nn.Module:
        """Remove the hooks and return the wrapped model, unchanged."""
        self.ejected = True
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        return self.vit

    def forward(self, img: torch.Tensor, return_embeddings_only: bool = False) -> Any:
        if self.ejected:
            raise RuntimeError("this Extractor has been ejected (eject() returned the model); wrap the model again")
        self.clear()
        pred = self.vit(img)
        target = self.device if self.device is not None else img.device
        latents = {k: _map_tensors(lambda t: t.to(target), v) for k, v in self.latents.items()}
        self.clear()
        embeddings = latents if self._many else next(iter(latents.values()), None)
        if return_embeddings_only or self.return_embeddings_only:
            return embeddings
        return pred, embeddings
