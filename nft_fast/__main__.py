import os
import sys

from .app.cli import main

code = main()
if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
    # Under torchrun, torch 2.13's gloo can abort in interpreter teardown (SIGABRT) after a run
    # that finished and wrote everything; leave without that teardown so the exit code is true.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)
sys.exit(code)
