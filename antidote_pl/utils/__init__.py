"""Small shared utilities (atomic I/O, distributed helpers)."""
