"""Scale-out: papermill sweeps, the accelerate launch entry, GPU cost estimates, the TL;DR and HH tasks."""
