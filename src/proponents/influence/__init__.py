"""The public influence classes."""
