# Seed README: "Accessing Embeddings"
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

from ssl_vit import Extractor
v = Extractor(v)

img = torch.randn(1, 3, 256, 256)
logits, embeddings = v(img)

embeddings
# expect: embeddings.shape == (1, 65, 1024)
# expect: logits.shape == (1, 1000)
