# Packaging targets. The tests and the demo run through scripts/ (see README).
#
#   make deb                                  package for this machine (amd64, its /usr/bin/python3)
#   make deb ARCH=arm64 PYTHON=3.8            JetPack 5 (Xavier NX, Ubuntu 20.04)
#   make deb ARCH=arm64 PYTHON=3.10 GLIBC=2.35   JetPack 6 (Orin, Ubuntu 22.04)
#
# ARCH: Debian architecture of the target. PYTHON: the target's python3 minor version.
# GLIBC: the oldest glibc the package must run on (picks the wheels). The .deb lands in dist/,
# downloaded wheels are cached in build/wheels/ (a rebuild works offline).

ARCH ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3.8)
GLIBC ?= 2.31
COMPRESS ?= xz
# The interpreter that runs the build (needs pip >= 22.2); the project's .venv when there is one.
BUILD_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: deb deb-jetpack5 deb-jetpack6 clean-deb

deb:
	$(BUILD_PYTHON) packaging/debian/build_deb.py --arch $(ARCH) --python $(PYTHON) --glibc $(GLIBC) \
		--compress $(COMPRESS) --out dist

deb-jetpack5:
	$(MAKE) deb ARCH=arm64 PYTHON=3.8 GLIBC=2.31

deb-jetpack6:
	$(MAKE) deb ARCH=arm64 PYTHON=3.10 GLIBC=2.35

clean-deb:
	rm -rf build/deb dist/edge-agent_*.deb
