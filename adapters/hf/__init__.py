"""Hugging Face model surgery: block discovery, input capture, blocks as pure functions, placement, loading."""
