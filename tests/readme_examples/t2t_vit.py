# Seed README: "Token-to-Token ViT"
import torch
from backbones import T2TViT

v = T2TViT(
    dim = 512,
    image_size = 224,
    depth = 5,
    heads = 8,
    mlp_dim = 512,
    num_classes = 1000,
    t2t_layers = ((7, 4), (3, 2), (3, 2))
)

img = torch.randn(1, 3, 224, 224)

preds = v(img)
# expect: preds.shape == (1, 1000)
# expect: v.mask_grid((224, 224)) == (14, 14)
