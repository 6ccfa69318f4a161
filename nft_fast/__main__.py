import os
import sys

from .app.cli import main
from .distributed import _launched

code = main()
if _launched():
    # Under torchrun, torch 2.13's gloo can abort in interpreter teardown (SIGABRT) after a run
    # that finished and wrote everything; leave without that teardown so the exit code is true.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
