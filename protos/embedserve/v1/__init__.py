"""Generated protocol code for embedserve.v1 (see protos/generate.py)."""
