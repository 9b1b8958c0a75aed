# Seed README: "Vision Transformer for Small Datasets" (the SPT module by itself)
import torch
from backbones import SPT

spt = SPT(
    dim = 1024,
    patch_size = 16,
    channels = 3
)

img = torch.randn(4, 3, 256, 256)
tokens = spt(img)
# expect: tokens.shape == (4, 256, 1024)
