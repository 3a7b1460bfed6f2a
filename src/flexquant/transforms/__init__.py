"""Weight/activation transforms: Hadamard rotations (DOSA), norm folding."""
