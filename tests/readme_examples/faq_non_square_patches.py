# Seed README: "FAQ - How do I pass in non-square patches?"
import torch
from backbones import ViT

v = ViT(
    num_classes = 1000,
    image_size = (256, 128),
    patch_size = (32, 16),
    dim = 1024,
    depth = 6,
    heads = 16,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

img = torch.randn(1, 3, 256, 128)

preds = v(img)
# expect: preds.shape == (1, 1000)
