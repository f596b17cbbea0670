"""Platform pieces too OS-specific for platform_info: macOS disk mapping, page-cache eviction, limits.

Each OS call is a parameter of a small function, so the macOS paths run on Linux in tests with
the call replaced by a fake or a recorded output.
"""
