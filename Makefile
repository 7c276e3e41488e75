# Two commands on a fresh machine:
#   make demo   set up, then run the main job on the embedded default (local Ray, sample images)
#   make test   set up, then run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup samples clean labelstudio loop

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements/torch.txt
	$(BIN)/pip install --quiet -r requirements/torch.txt
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# datumaro (the library CVAT's importers run on) imports our CVAT archives in tests/exports/test_exports.py;
# its pins clash with ours, so it gets a venv of its own.
DATUMARO := .venv-datumaro
$(DATUMARO)/.installed: requirements/datumaro.txt
	$(PYTHON) -m venv $(DATUMARO)
	$(DATUMARO)/bin/pip install --quiet -r requirements/datumaro.txt
	touch $@

samples: setup
	$(BIN)/python -m batchseg.samples samples --bad

demo: samples
	$(BIN)/batchseg run --config jobs/configs/local-demo.yaml
	@echo "annotations: out/demo/annotations  summary: out/demo/run.json"

# The Label Studio server tests/exports/test_labelstudio_push.py starts on 127.0.0.1; its pins clash with ours.
LABELSTUDIO := .venv-labelstudio
$(LABELSTUDIO)/.installed: requirements/labelstudio.txt
	$(PYTHON) -m venv $(LABELSTUDIO)
	$(LABELSTUDIO)/bin/pip install --quiet --upgrade pip
	$(LABELSTUDIO)/bin/pip install --quiet -r requirements/labelstudio.txt
	touch $@

labelstudio: $(LABELSTUDIO)/.installed

test: setup $(DATUMARO)/.installed $(LABELSTUDIO)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole flywheel on CPU: random-init run -> Label Studio -> scripted annotator -> pull ->
# train (ResNet-18 FPN, minutes) -> run with the new weights -> AP before/after and renders.
loop: setup $(LABELSTUDIO)/.installed
	$(BIN)/python benchmarks/loop.py --work out/loop

clean:
	rm -rf $(VENV) $(DATUMARO) $(LABELSTUDIO) samples out
