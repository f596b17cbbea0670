"""Entry script of the frozen MoeBar binary (PyInstaller runs this as __main__).

The same binary is the app and, for the app's child processes, the interpreter:
`app.frozen.run_helper` runs the engine (`--engine-stdio`), `-m MODULE`, `-c CODE` or
`--self-check`; any other command line starts the app. The check comes before anything
imports Qt, so the engine process does not load the GUI's libraries.
"""

from __future__ import annotations

import sys

from app.frozen import run_helper


def main() -> int:
    """Run a helper when the command line names one, else the menu-bar app."""
    status = run_helper(sys.argv)
    if status is not None:
        return status
    from app.main import main as app_main

    return app_main()


if __name__ == "__main__":
    sys.exit(main())
