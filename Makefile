# Two commands for a new user (README): `make demo` and `make test`. Both create .venv with
# python3, install the package with the extras they need, and run. Nothing else is required.
#
#   make demo      offline demo: the whole pipeline (dvc repro, push, clone, pull) against loopback replicas
#   make test      mypy on the source protocol, then every test (offline; also what CI runs)
#   make test-fast the fast tier: every test not marked slow, on 2 processes (the loop after each edit)
#   make repro     the real pipeline from the public services (needs internet)
#   make publish   maintainer: repro, push to the S3 remote, commit dvc.lock, tag (TAG=v1.0)
#   make install   only set up .venv
#   make lock      maintainer: refresh constraints.txt (pinned versions pip installs) from .venv
#
# torch: TORCH (default torch==2.13.0, a CPU wheel where the machine's pip provides one); set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to force PyTorch's CPU builds elsewhere, or
# TORCH= to install without torch (its tests are then skipped).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TAG ?=
export DVC_NO_ANALYTICS := 1
export AWS_EC2_METADATA_DISABLED := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

BIN := $(VENV)/bin
STAMP := $(VENV)/.emdata-installed

.PHONY: install demo test test-fast repro publish clean-venv lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing emdata with its pipeline and test extras into $(VENV) (log: $(VENV)/pip.log)"
	@$(BIN)/python -m pip install $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(TORCH) -c constraints.txt -e ".[pipeline,dask,distributed,dm3,precomputed,test]" \
		> $(VENV)/pip.log 2>&1 || { grep -v "^WARNING: Location" $(VENV)/pip.log | tail -40; exit 1; }
	$(BIN)/python -c "import emdata, h5py, dvc" && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m emdata demo

test: $(STAMP)  # both tiers, on 2 processes (pytest-xdist; every test's ports and folders are its own)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n 2

test-fast: $(STAMP)  # tiers are assigned in tests/conftest.py
	$(BIN)/python -m pytest -q -m "not slow" -n 2

repro: $(STAMP)  # --keep-going: a source that is unreachable today does not stop the other datasets
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro --keep-going

publish: $(STAMP)
	@test -n "$(TAG)" || { echo "make publish: set TAG, e.g. make publish TAG=v1.0"; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m emdata check
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/dvc push -r s3
	$(BIN)/dvc push
	git add dvc.lock METADATA_SUMMARY.md data/metadata.csv data/croissant.json data/croissant thumbnails data/inputs
	git commit -m "Publish $(TAG): dvc.lock and generated summary"
	git tag -a $(TAG) -m "emdata data release $(TAG)"
	@echo "published $(TAG): now git push --follow-tags"

lock: $(STAMP)  # maintainer: record the versions in .venv as constraints.txt (after a passing make test)
	@{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -e '^torch==' -e '^emdata' -e '^-e'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean-venv:
	rm -rf $(VENV)
