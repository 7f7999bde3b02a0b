"""`slimkit optimize`: presets, plans, the time budget, candidates and the search loop."""
