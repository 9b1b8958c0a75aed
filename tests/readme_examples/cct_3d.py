# Seed README: "3D version of CCT"
import torch
from backbones import CCT3D as CCT

cct = CCT(
    img_size = 224,
    num_frames = 8,
    embedding_dim = 384,
    n_conv_layers = 2,
    frame_kernel_size = 3,
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
    positional_embedding = 'learnable'
)

video = torch.randn(1, 3, 8, 224, 224)
pred = cct(video)
# expect: pred.shape == (1, 1000)
# expect: cct.mask_grid((8, 224, 224)) == (8, 14, 14)
