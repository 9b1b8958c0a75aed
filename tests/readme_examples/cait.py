# Seed README: "CaiT"
import torch
from backbones import CaiT

v = CaiT(
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
    layer_dropout = 0.05
)

img = torch.randn(1, 3, 256, 256)

preds = v(img)
# expect: preds.shape == (1, 1000)
# expect: torch.isfinite(preds).all()
