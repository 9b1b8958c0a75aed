# Seed README: "CCT"
import torch
from backbones import CCT

cct = CCT(
    img_size = (224, 448),
    embedding_dim = 384,
    n_conv_layers = 2,
    kernel_size = 7,
    stride = 2,
    padding = 3,
    pooling_kernel_size = 3,
    pooling_stride = 2,
    pooling_padding = 1,
    num_layers = 14,
    num_heads = 6,
    mlp_ratio = 3.,
    num_classes = 1000,
    positional_embedding = 'learnable',
)

img = torch.randn(1, 3, 224, 448)
pred = cct(img)
# expect: pred.shape == (1, 1000)
# expect: cct.mask_grid((224, 448)) == (14, 28)
