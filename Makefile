# Two entry points: `make serve` (the main job) and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test lint venv browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	# the parity references (test-only): their pins ask for a torchaudio that has no build for our torch (and
	# other torches), so they go in without dependencies; the ones the tests use are in the dev extra
	$(VENV)/bin/pip install --quiet --no-deps -c constraints.txt qwen-tts==0.1.1 cosyvoice-minicpmo==0.1.0 \
		chatterbox-tts==0.1.7 s3tokenizer==0.3.0 hyperpyyaml==1.2.3 diffusers==0.29.0 conformer==0.3.2
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	STREAMVOX_CACHE=$${STREAMVOX_CACHE:-$(CURDIR)/.cache} $(VENV)/bin/streamvox serve --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(VENV)/bin/ruff check streamvox tests benchmarks
	$(VENV)/bin/lint-imports

# the playground's test drives a real browser: Debian's chromium (as root, or through sudo)
browser:
	@command -v chromium >/dev/null || { sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
		--no-install-recommends chromium >/dev/null; }

test: lint browser
	STREAMVOX_CACHE=$${STREAMVOX_CACHE:-$(CURDIR)/.cache} $(VENV)/bin/python -m pytest -q
