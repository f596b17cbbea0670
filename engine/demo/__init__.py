"""The built-in demo model and the tokenizer files it ships with (also used by the tests)."""
