"""Plain `nn.Module` architectures, one family per file; importing registers them."""
