# Seed README: "Vision Transformer for Small Datasets"
import torch
from backbones import SmallDatasetViT as ViT

v = ViT(
    image_size = 256,
    patch_size = 16,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    heads = 16,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

img = torch.randn(4, 3, 256, 256)

preds = v(img)
# expect: preds.shape == (4, 1000)
