"""Test double of pycuda (only `pycuda.driver` is provided). Version attributes as pycuda/__init__.py has them."""

VERSION = (2022, 2, 2)
VERSION_STATUS = ""
VERSION_TEXT = ".".join(str(x) for x in VERSION) + VERSION_STATUS
