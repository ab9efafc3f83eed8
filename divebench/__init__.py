"""divebench: a benchmark harness for batch-size policies in PyTorch."""

__version__ = "0.1.0"
