# Seed README: "Learnable Memory ViT"
import torch
from backbones import ViT, Adapter

v = ViT(
    image_size = 256,
    patch_size = 16,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    heads = 8,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

img = torch.randn(4, 3, 256, 256)
logits = v(img)

adapter1 = Adapter(
    vit = v,
    num_classes = 2,
    num_memories_per_layer = 5
)

logits1 = adapter1(img)

adapter2 = Adapter(
    vit = v,
    num_classes = 4,
    num_memories_per_layer = 10
)

logits2 = adapter2(img)
# expect: logits.shape == (4, 1000) and logits1.shape == (4, 2) and logits2.shape == (4, 4)
# expect: not any(p.requires_grad for p in v.parameters())
