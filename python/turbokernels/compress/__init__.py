"""Weight compression that changes which weights exist (pruning), as opposed to how they are stored (formats/)."""
from .prune import is_24_sparse, prune_24

__all__ = ["prune_24", "is_24_sparse"]
