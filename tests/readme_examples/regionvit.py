# Seed README: "RegionViT"
import torch
from backbones import RegionViT

model = RegionViT(
    dim = (64, 128, 256, 512),
    depth = (2, 2, 8, 2),
    window_size = 7,
    num_classes = 1000,
    tokenize_local_3_conv = False,
    use_peg = False,
)

img = torch.randn(1, 3, 224, 224)

pred = model(img)
# expect: pred.shape == (1, 1000)
