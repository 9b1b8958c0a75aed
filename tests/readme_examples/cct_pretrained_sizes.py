# Seed README: "CCT" (the pre-defined sizes)
import torch
from backbones import cct_14

cct = cct_14(
    img_size = 224,
    n_conv_layers = 1,
    kernel_size = 7,
    stride = 2,
    padding = 3,
    pooling_kernel_size = 3,
    pooling_stride = 2,
    pooling_padding = 1,
    num_classes = 1000,
    positional_embedding = 'learnable',
)
# expect: cct.embed_dim == 384 and len(cct.blocks) == 14 and cct.blocks[0].attn.heads == 6
# expect: cct.blocks[0].mlp.fc1.out_features == 3 * 384
# expect: cct(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
