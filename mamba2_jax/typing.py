"""Shape letters used in names, comments and einsum strings across the package.

    b batch (sequences)       t packed tokens (varlen)     l sequence length
    d hidden size (d_model)   i intermediate = h*p         h SSM heads     p head dim
    g B/C groups              n state size                 q chunk size    c number of chunks
    k conv kernel width       s TP shards                  v vocab

Head ``j`` reads B/C group ``j // (h // g)`` (contiguous blocks of heads share a group).
"""

from __future__ import annotations

from typing import Literal

import jax

Array = jax.Array
Impl = Literal["auto", "xla", "pallas"]
