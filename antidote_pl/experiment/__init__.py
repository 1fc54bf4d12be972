"""The experiment layer: the pipeline recipe and its cache, seeds, analyses, reports, manifest, replay,
re-attack and rescoring. Above every building block; below only the commands."""
