# Packaging targets. The tests and the demo run through scripts/ (see README).
#
#   make deb                 development package for this machine (amd64, its /usr/bin/python3)
#   make deb-bookworm        Debian 12 amd64 (Python 3.11)           version <upstream>+deb12
#   make deb-jetpack5        JetPack 5 (Ubuntu 20.04, Python 3.8)    version <upstream>+jp5
#   make deb-jetpack6        JetPack 6 (Ubuntu 22.04, Python 3.10)   version <upstream>+jp6
#   make apt-repo            all three in one signed apt repository (build/apt-repo), one suite each
#   make lock-TARGET         re-resolve TARGET's wheels and rewrite packaging/debian/locks/TARGET.txt
#
# The named targets install the wheels pinned with hashes in packaging/debian/locks/, so a rebuild at the
# same commit gives the same bytes; they also build edge-agent-fleet and edge-agent-broker. `make deb`
# resolves wheels afresh (ARCH, PYTHON, GLIBC pick the platform). Packages land in dist/<target>/,
# downloaded wheels are cached in build/wheels/ (a rebuild works offline).
#
# apt-repo signs with APT_KEY from the gpg home APT_GNUPG_HOME; without APT_KEY a test key is generated
# there once. docs/apt-repository.md says how a device adds the repository.

ARCH ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3.8)
GLIBC ?= 2.31
COMPRESS ?= xz
APT_GNUPG_HOME ?= build/apt-gnupg
APT_KEY ?=
# The interpreter that runs the build (needs pip >= 22.2); the project's .venv when there is one.
BUILD_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BUILDER = $(BUILD_PYTHON) packaging/debian/build_deb.py
TARGETS = bookworm jetpack5 jetpack6

.PHONY: deb $(addprefix deb-,$(TARGETS)) $(addprefix lock-,$(TARGETS)) apt-repo clean-deb

deb:
	$(BUILDER) --arch $(ARCH) --python $(PYTHON) --glibc $(GLIBC) --compress $(COMPRESS) --out dist

$(addprefix deb-,$(TARGETS)): deb-%:
	rm -rf dist/$*
	$(BUILDER) --target $* --compress $(COMPRESS) --out dist/$*

$(addprefix lock-,$(TARGETS)): lock-%:
	$(BUILDER) --target $* --update-lock --compress none --out build/lock-check/$*

apt-repo: $(addprefix deb-,$(TARGETS))
	python3 packaging/apt/make_repo.py --out build/apt-repo --gnupg-home $(APT_GNUPG_HOME) \
		$(if $(APT_KEY),--key-id $(APT_KEY)) $(foreach t,$(TARGETS),$(t)=dist/$(t))

clean-deb:
	rm -rf build/deb build/apt-repo dist/edge-agent*.deb $(addprefix dist/,$(TARGETS))
