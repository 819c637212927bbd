"""The server wing."""
