# Seed README: "PiT"
import torch
from backbones import PiT

v = PiT(
    image_size = 224,
    patch_size = 14,
    dim = 256,
    num_classes = 1000,
    depth = (3, 3, 3),
    heads = 16,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)


img = torch.randn(1, 3, 224, 224)

preds = v(img)
# expect: preds.shape == (1, 1000)
