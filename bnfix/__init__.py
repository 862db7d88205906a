"""bnfix."""
