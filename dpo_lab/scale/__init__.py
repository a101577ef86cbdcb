"""Scale-out machinery, apart from the teaching path: papermill sweeps (``sweep``), cost and memory
estimates (``estimate``), the paper's other tasks (``hub_preferences``, ``hub_tasks``) and the
``accelerate launch`` entry point (``launch``)."""
