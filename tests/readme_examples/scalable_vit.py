# Seed README: "ScalableViT"
import torch
from backbones import ScalableViT

model = ScalableViT(
    num_classes = 1000,
    dim = 64,
    heads = (2, 4, 8, 16),
    depth = (2, 2, 20, 2),
    ssa_dim_key = (40, 40, 40, 32),
    reduction_factor = (8, 4, 2, 1),
    window_size = (64, 32, None, None),
    dropout = 0.1,
)

img = torch.randn(1, 3, 256, 256)

preds = model(img)
# expect: preds.shape == (1, 1000)
