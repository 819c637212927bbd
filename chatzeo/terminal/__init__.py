"""The terminal wing."""
