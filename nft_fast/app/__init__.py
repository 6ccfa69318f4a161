"""The application: the ``nft-fast`` command line, the purify-to-a-folder pipeline, the demo
and reports. Imports point down only: the app uses the harness and the core."""
