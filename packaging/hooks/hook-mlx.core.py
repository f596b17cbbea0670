"""PyInstaller hook for mlx.core, MLX's native extension (written for MoeBar's bundles).

What PyInstaller's import analysis cannot see by itself:
- mlx.core imports mlx._reprlib_fix and mlx.__array_api_info from C++ when it loads.
- libmlx (mlx/lib/libmlx.so or .dylib) must stay in mlx/lib: MLX finds its files beside
  the library it runs from (dladdr), i.e. mlx.metallib on macOS (the GPU kernels; without
  it every GPU operation fails with "Failed to load the default metallib") and, for the CPU
  compiler, mlx/include.
  PyInstaller also links every package library into the top-level folder, and on Linux the
  bootloader's LD_LIBRARY_PATH makes the loader take that link, so MLX would look beside
  _internal/libmlx.so. Without the link (Linux only: on macOS PyInstaller rewrites library
  paths to the top level and needs it), mlx.core finds libmlx through its own RUNPATH, mlx/lib.
- The Linux wheel's BLAS/LAPACK (mlx_cpu.libs) are found through libmlx's dependencies.
"""

import sys

from PyInstaller.utils.hooks import collect_data_files, collect_dynamic_libs

hiddenimports = ["mlx._reprlib_fix", "mlx.__array_api_info"]
binaries = collect_dynamic_libs("mlx")
datas = collect_data_files("mlx", includes=["lib/*.metallib", "include/**/*.h"])

if sys.platform.startswith("linux"):
    bindepend_symlink_suppression = ["**/mlx/lib/libmlx.so"]
