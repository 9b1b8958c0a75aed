"""Frozen features and the weighted k-NN classifier of DINO (Caron et al. 2021, Sec. 4.1; Wu et al. 2018).

Each process embeds its own share of the data (the shard streams are already split by rank); the
features are then gathered so every process holds all of them. `knn_accuracy` is what the launcher
calls as its monitor every N steps; `linear_probe.py` uses the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.layers import Block

from .errors import LaunchError

__all__ = ["extract_features", "knn_classify", "knn_accuracy", "normalizer", "last_blocks_cls"]


def normalizer(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               size: int | Sequence[int] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B, 3, H, W) -> float (B, 3, h, w): scaled to [0, 1], resized to `size` when given
    (bicubic, antialiased), normalised with mean/std as in pretraining."""
    def apply(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if size is not None:
            target = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        m = x.new_tensor(mean).view(1, -1, 1, 1)
        s = x.new_tensor(std).view(1, -1, 1, 1)
        return (x - m) / s
    return apply


def last_blocks_cls(backbone: nn.Module, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """DINO's ViT linear-eval features: the class tokens of the last `n` blocks, each through the
    final norm, concatenated: x -> (B, n * D). IncompatibleBackbone-like LaunchError without
    transformer blocks or a class token."""
    blocks = [m for m in backbone.modules() if isinstance(m, Block)]
    norm = getattr(backbone, "norm", None)
    if len(blocks) < n or backbone.num_prefix_tokens - backbone.num_registers < 1 or not isinstance(norm, nn.Module):
        raise LaunchError(f"--n-last-blocks {n}: {type(backbone).__name__} has no class token over at least "
                          f"{n} transformer blocks; use the pooled features (--n-last-blocks 0)")
    outputs: list[torch.Tensor] = []

    def features(x: torch.Tensor) -> torch.Tensor:
        outputs.clear()
        hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in blocks[-n:]]
        try:
            backbone.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat([norm(o[:, 0]) for o in outputs[-n:]], dim=-1)
    return features


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)  # DDP / accelerate wrappers


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable[dict], accelerator, *,
                     prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every labelled sample of `loader` across all processes.

    Returns (features (N, D) float32, labels (N,) long) on every process. `prepare` maps the
    uint8 batch to the backbone's input (default: ImageNet normalisation); `features` maps it
    to (B, D) (default: the pooled features). The backbone's train/eval mode is restored after.
    """
    model = _unwrap(backbone)
    was_training = model.training
    model.eval()
    prepare = prepare or normalizer()
    features = features or (lambda x: model.forward_features(x).pooled)
    feats, labels = [], []
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = prepare(batch["image"].to(accelerator.device, non_blocking=True))
            with accelerator.autocast():
                f = features(x)
            feats.append(f.float())
            labels.append(batch["label"].to(accelerator.device))
    finally:
        model.train(was_training)
    dim = feats[0].shape[-1] if feats else 0
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim, device=accelerator.device)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    if accelerator.num_processes > 1:
        # processes hold different counts: pad to the longest with label -2, gather, drop the padding
        if not feats:  # the width is needed for padding: ask the others
            local_f = torch.zeros(0, 1, device=accelerator.device)
        width = int(accelerator.gather(torch.tensor([local_f.shape[-1]], device=accelerator.device)).max())
        if local_f.shape[-1] != width:
            local_f = torch.zeros(0, width, device=accelerator.device)
        local_f = accelerator.pad_across_processes(local_f, dim=0)
        local_y = accelerator.pad_across_processes(local_y, dim=0, pad_index=-2)
        local_f, local_y = accelerator.gather(local_f), accelerator.gather(local_y)
        real = local_y != -2
        local_f, local_y = local_f[real], local_y[real]
    return local_f, local_y


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                 k: int = 20, t: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN votes (DINO): cosine similarity to the k nearest training features, each
    neighbour voting for its class with weight exp(sim / t). Returns class scores (M, C)."""
    if train_features.shape[0] == 0:
        raise LaunchError("k-NN: no labelled training features")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):  # chunks bound the (M, N) similarity matrix
        q = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=bank.device)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent of scores (M, C) against labels (M,)."""
    if labels.numel() == 0:
        return [float("nan")] * len(ks)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks]


def knn_accuracy(backbone: nn.Module, train_loader: Iterable[dict], val_loader: Iterable[dict], accelerator,
                 k: int = 20, t: float = 0.07, *, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_batches: int | None = None) -> float:
    """k-NN top-1 accuracy in percent of the backbone's pooled features (the launcher's monitor).

    Loaders give one pass of labelled batches `{"image": uint8, "label": long}` (this process's
    share); every process returns the same number.
    """
    train_f, train_y = extract_features(backbone, train_loader, accelerator, prepare=prepare, max_batches=max_batches)
    val_f, val_y = extract_features(backbone, val_loader, accelerator, prepare=prepare, max_batches=max_batches)
    train_f, train_y = train_f[train_y >= 0], train_y[train_y >= 0]
    keep = val_y >= 0
    scores = knn_classify(train_f, train_y, val_f[keep], k=k, t=t,
                          num_classes=int(max(train_y.max(), val_y.max())) + 1 if train_y.numel() else None)
    return topk_accuracy(scores, val_y[keep], ks=(1,))[0]
