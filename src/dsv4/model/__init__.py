"""The DeepSeek-V4 network: pure computation, no I/O."""
