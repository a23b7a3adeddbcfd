"""torch.library ops of the `ferrum` namespace. Importing this module registers them."""
