# Two entry points a newcomer needs: `make reproduce` (the CPU reproduction) and `make test`.
# Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= cpu

BOOK ?= _build/book

.PHONY: setup test reproduce notebooks lint student book

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.installed

# The book's packages (pyproject's `book` group), installed on first use of `make book` or `make test`.
$(VENV)/.book-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,book]'
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The test suite includes tests/test_book.py: it builds the book and reads every page in headless Chromium
# (Debian: `apt-get install chromium chromium-driver`; without them it is skipped, outside CI).
# Each test runs on one thread (tests/conftest.py), so one worker per core runs test files side by side;
# --dist loadfile keeps a notebook's cells in the one kernel nbval starts for it.
test: lint $(VENV)/.book-installed
	$(PY) -m pytest -n auto --dist loadfile

reproduce: $(VENV)/.installed
	$(PY) -m dpo_lab reproduce --preset $(PRESET)

# Re-pair and re-execute the notebooks after editing their .py sources. The committed outputs come from the
# cpu preset (run `make reproduce` first so its stages are cached); TQDM_DISABLE keeps progress bars out.
notebooks: $(VENV)/.installed
	$(VENV)/bin/jupytext --sync notebooks/*.py
	for nb in notebooks/*.ipynb; do DPO_LAB_PRESET=$(PRESET) TQDM_DISABLE=1 \
		$(VENV)/bin/jupyter execute --inplace "$$nb" || exit 1; done

# Student copies: notebooks/student/*.ipynb, each exercise's solution replaced by a stub (tests check they are current).
student: $(VENV)/.installed
	$(PY) scripts/student_copies.py

# The notebooks as a static HTML book (book/: Sphinx + myst-nb), from their committed outputs: no notebook is
# executed and nothing is fetched. Open $(BOOK)/html/index.html from disk; the folder can be published as is.
book: $(VENV)/.book-installed
	$(PY) -m sphinx -b html -c book -d $(BOOK)/doctrees -q . $(BOOK)/html
	@echo "The book: $(BOOK)/html/index.html"
