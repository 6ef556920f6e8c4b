"""Test double of pycuda (only `pycuda.driver` is provided)."""
