# Seed README: "XCiT"
import torch
from backbones import XCiT

v = XCiT(
    image_size = 256,
    patch_size = 32,
    num_classes = 1000,
    dim = 1024,
    depth = 12,
    cls_depth = 2,
    heads = 16,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1,
    layer_dropout = 0.05,
    local_patch_kernel_size = 3
)

img = torch.randn(1, 3, 256, 256)

preds = v(img)
# expect: preds.shape == (1, 1000)
