# Seed README: "Distillation"
# Changes besides the imports: `DistillableViT` is our plain `ViT` (the distillation token lives in
# DistillWrapper and reaches the ViT through `extra_tokens`), and `resnet50(weights=None)` replaces
# `resnet50(pretrained = True)` (no downloads). The README's closing `v = v.to_vit()` / `type(v)`
# lines are left out: the student is a plain ViT throughout, so there is nothing to convert.
import torch
from torchvision.models import resnet50
from backbones import ViT as DistillableViT
from objectives import DistillWrapper

teacher = resnet50(weights=None)

v = DistillableViT(
    image_size = 256,
    patch_size = 32,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    heads = 8,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

distiller = DistillWrapper(
    student = v,
    teacher = teacher,
    temperature = 3,
    alpha = 0.5,
    hard = False
)

img = torch.randn(2, 3, 256, 256)
labels = torch.randint(0, 1000, (2,))

loss = distiller(img, labels)
loss.backward()

pred = v(img)
# expect: pred.shape == (2, 1000)
# expect: torch.isfinite(loss).item()
# expect: distiller.uses_token and distiller.head is None
