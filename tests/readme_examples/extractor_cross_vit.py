# Seed README: "Accessing Embeddings" (CrossViT)
import torch
from backbones import CrossViT

v = CrossViT(
    image_size = 256,
    num_classes = 1000,
    depth = 4,
    sm_dim = 192,
    sm_patch_size = 16,
    sm_enc_depth = 2,
    sm_enc_heads = 8,
    sm_enc_mlp_dim = 2048,
    lg_dim = 384,
    lg_patch_size = 64,
    lg_enc_depth = 3,
    lg_enc_heads = 8,
    lg_enc_mlp_dim = 2048,
    cross_attn_depth = 2,
    cross_attn_heads = 8,
    dropout = 0.1,
    emb_dropout = 0.1
)

from ssl_vit import Extractor
v = Extractor(v, layer_name = 'multi_scale_encoder')

img = torch.randn(1, 3, 256, 256)
logits, embeddings = v(img)

embeddings
# expect: [tuple(e.shape) for e in embeddings] == [(1, 257, 192), (1, 17, 384)]
# expect: logits.shape == (1, 1000)
