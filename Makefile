# The README's commands. Everything installs into .venv in the checkout; the test control plane
# binaries are built from Go modules into ~/.cache/reloader-testenv (outside the checkout).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint unit demo demo-cluster bench bench-quick control-plane node-images wheel clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

control-plane:
	bash tests/controlplane/build.sh

# The test node (tests/node, tests/test_node.py): Debian packages (as root), kubelet, kube-proxy and
# kube-scheduler, and the images built locally; all cached outside the checkout.
node-images: control-plane
	bash tests/node/setup.sh
	bash tests/controlplane/build.sh node >/dev/null
	bash tests/node/images.sh

lint: $(STAMP)
	$(BIN)/ruff check reloader tests bench
	$(BIN)/ruff format --check reloader tests bench
	$(BIN)/mypy --strict reloader bench tests

test: $(STAMP) control-plane node-images lint
	$(BIN)/pytest -p no:cacheprovider -ra

unit: $(STAMP)
	$(BIN)/pytest -p no:cacheprovider -ra -m "not cluster"

demo: $(STAMP) control-plane
	$(BIN)/python -m tests.controlplane.demo

demo-cluster: $(STAMP) node-images
	$(BIN)/python -m tests.node.demo

bench: $(STAMP) control-plane
	$(BIN)/python -m bench

bench-quick: $(STAMP) control-plane
	$(BIN)/python -m bench --quick

wheel: $(STAMP)
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) dist build *.egg-info .demo
