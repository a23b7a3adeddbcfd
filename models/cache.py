"""StaticCache: preallocated K/V written in place (gpt-fast style), usable by generate() and torch.compile."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .config import GGUFConfig


class StaticCache(Cache):
    """K and V of every layer in preallocated [B, Hkv, max_len, D] tensors, written in place at the
    slots `cache_position` names: no per-token copy of the history (DynamicCache concatenates it),
    fixed shapes for a compiled decode step.

    `seen` counts the slots filled when the model picks the positions itself (a forward without
    `cache_position`, which is how generate() calls it): a host-side int, so neither the positions
    nor their bound check read anything back from the device.

    The layer tensors live only in the lists `k` and `v` (nothing else holds them), so `.to()`
    cannot leave a stale copy behind. Tensors of a layer are allocated on its first update when
    the batch size was not given (generate() builds the cache before it knows its batch).
    """

    # generate() must neither auto-compile our forward nor build transformers' 4-D masks for it
    # (it does both for "compileable" caches); cropping (assisted decoding) is not supported.
    is_compileable = False
    is_croppable = False

    def __init__(self, config: GGUFConfig, batch_size: int | None, max_len: int, device=None, dtype=torch.float32):
        # Cache.__init__'s arguments differ between transformers versions and its per-layer objects
        # are not used here: this class sets everything it reads.
        if not 0 < max_len <= config.max_position_embeddings:
            raise ValueError(f"static cache length {max_len} outside 1..{config.max_position_embeddings} (the context length)")
        self.layers = []
        self.max_len, self.seen = int(max_len), 0
        self.context_length = config.max_position_embeddings
        self._head = (config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        if batch_size is None:
            self.k, self.v = [None] * n, [None] * n
        else:
            shape = (batch_size, *self._head[:1], self.max_len, self._head[1])
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]

    def layer(self, layer_idx: int, k):
        """(K, V) tensors of a layer, allocated like `k` ([B, Hkv or T, ..., D]: batch, dtype, device) if new."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if kc is None:
            shape = (k.shape[0], self._head[0], self.max_len, self._head[1])
            kc = self.k[layer_idx] = torch.zeros(shape, device=k.device, dtype=k.dtype)
            vc = self.v[layer_idx] = torch.zeros(shape, device=k.device, dtype=k.dtype)
        return kc, vc

    def update(self, k, v, layer_idx, cache_kwargs):
        pos = cache_kwargs["cache_position"]
        kc, vc = self.layer(layer_idx, k)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return kc, vc

    def check_room(self, start: int, T: int) -> None:
        """ValueError unless slots [start, start + T) exist (host ints: no device read)."""
        if start + T > self.max_len:
            ctx = ", the context length of this model" if self.max_len == self.context_length else ""
            raise ValueError(f"sequence of {start + T} tokens ({start} cached + {T} new) exceeds the static cache "
                             f"of {self.max_len} slots{ctx}")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.seen = 0  # stale slots are never read: the mask only admits slots up to the query's own

    def to(self, *args, **kwargs) -> "StaticCache":
        self.k = [t if t is None else t.to(*args, **kwargs) for t in self.k]
        self.v = [t if t is None else t.to(*args, **kwargs) for t in self.v]
        return self

    def __len__(self) -> int:
        return len(self.k)

    def __repr__(self) -> str:
        return f"StaticCache(layers={len(self.k)}, max_len={self.max_len}, seen={self.seen})"
