"""Per-op tests: every backend of an op (torch oracle, triton, cpp, cuda) in its tests/ops/test_<op>.py."""
