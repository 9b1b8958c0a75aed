# Seed README: "Patch Merger" (the model)
import torch
from backbones import PatchMergerViT as ViT

v = ViT(
    image_size = 256,
    patch_size = 16,
    num_classes = 1000,
    dim = 1024,
    depth = 12,
    heads = 8,
    patch_merge_layer = 6,
    patch_merge_num_tokens = 8,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

img = torch.randn(4, 3, 256, 256)

preds = v(img)
# expect: preds.shape == (4, 1000)
