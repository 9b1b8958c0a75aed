# Seed README: "MaxViT"
import torch
from backbones import MaxViT

v = MaxViT(
    num_classes = 1000,
    dim_conv_stem = 64,
    dim = 96,
    dim_head = 32,
    depth = (2, 2, 5, 2),
    window_size = 7,
    mbconv_expansion_rate = 4,
    mbconv_shrinkage_rate = 0.25,
    dropout = 0.1
)

img = torch.randn(2, 3, 224, 224)

preds = v(img)
# expect: preds.shape == (2, 1000)
