"""Test-wide settings: every notebook run by nbval and every pipeline test uses the ``smoke`` preset,
quietly, with a non-interactive plotting backend."""

import os
import tempfile

os.environ.setdefault("DPO_LAB_PRESET", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Figures made under test go to a scratch folder, so a test run never rewrites the committed figures/.
os.environ.setdefault("DPO_LAB_FIGURES", tempfile.mkdtemp(prefix="dpo_lab_figures_"))
os.environ.setdefault("DPO_LAB_RUNS", tempfile.mkdtemp(prefix="dpo_lab_runs_"))
