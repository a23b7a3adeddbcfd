"""nn.Modules built on the ferrum ops."""
