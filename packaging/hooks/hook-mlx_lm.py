"""PyInstaller hook for mlx_lm (written for MoeBar's bundles).

mlx_lm picks a model's module by name at run time (`mlx_lm.models.<model_type>`), and its
tool-call parsers and processors the same way, so every module of those packages is bundled.
Training and evaluation modules (which need packages MoeBar does not ship) are left out.
"""

from PyInstaller.utils.hooks import collect_data_files, collect_submodules

_TRAINING = ("mlx_lm.tuner", "mlx_lm.lora", "mlx_lm.fuse", "mlx_lm.evaluate", "mlx_lm.examples")


def _wanted(name: str) -> bool:
    return not any(name == prefix or name.startswith(prefix + ".") for prefix in _TRAINING)


hiddenimports = collect_submodules("mlx_lm", filter=_wanted)
datas = collect_data_files("mlx_lm", excludes=["**/*.md"])
