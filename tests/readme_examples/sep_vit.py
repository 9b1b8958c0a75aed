# Seed README: "SepViT"
import torch
from backbones import SepViT

v = SepViT(
    num_classes = 1000,
    dim = 32,
    dim_head = 32,
    heads = (1, 2, 4, 8),
    depth = (1, 2, 6, 2),
    window_size = 7,
    dropout = 0.1
)

img = torch.randn(1, 3, 224, 224)

preds = v(img)
# expect: preds.shape == (1, 1000)
