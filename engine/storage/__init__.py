"""Bytes on disk: the safetensors index, expert byte ranges, the packed layout and pack, the expert store."""
