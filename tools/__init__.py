"""Developer tools of the clipdeploy repository (not shipped in the wheel): the coverage sweep and the benchmark matrix."""
