"""Shared test helpers: inputs and runs of the ops (bn_cases, mixup_cases), models (nets), the
command line's generated inputs (cli_inputs), the extension rebuilds of the sanitizer tests
(ext_build) and scripts the tests run as subprocesses (onednn_guard_run, sm90_compile)."""
