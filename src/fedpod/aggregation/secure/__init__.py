"""Secure aggregation (Bonawitz et al., CCS 2017; the sparse neighbour graph of Bell et al.,
CCS 2020): the modeller learns the sample-weighted sum of the pods' updates and nothing else,
even when pods drop out after the key exchange.

- `fixedpoint`: clipping, quantisation and sample weighting into the ring of 2^64;
- `shamir`: t-of-n secret sharing of the 32-byte secrets;
- `masks`: key agreement and the mask expansion (AES-256-CTR);
- `protocol`: the pod's and the modeller's halves, pure (no I/O), so that every property is
  tested in-process and the transport only carries their messages.
"""
