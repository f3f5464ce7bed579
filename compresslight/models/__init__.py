"""Plain `nn.Module` architectures, one family per file; importing registers them."""

from compresslight.models import alexnet, resnet, resnet_a, vgg  # noqa: F401  (registers the entrypoints)
