# Seed README: "Accessing Attention"
import torch
from backbones import ViT

v = ViT(
    image_size = 256,
    patch_size = 32,
    num_classes = 1000,
    dim = 1024,
    depth = 6,
    heads = 16,
    mlp_dim = 2048,
    dropout = 0.1,
    emb_dropout = 0.1
)

from ssl_vit import Recorder
v = Recorder(v)

img = torch.randn(1, 3, 256, 256)
preds, attns = v(img)

attns

# to cleanup the class and the hooks once you have collected enough data

v = v.eject()

# expect: attns.shape == (1, 6, 16, 65, 65)
# expect: preds.shape == (1, 1000)
# expect: type(v).__name__ == 'ViT'
