"""`slimkit optimize`: the search for the best compressed model under a quality budget, in parts.

    presets       what is tried, as data: candidates per preset and runtime, the search's margins
    config        OptimizeConfig, the target a run ranks by, the CLI's duration and fraction parsing
    plan          the candidates for a model kind, a preset and a runtime; the runtime checks
    budget        the time budget: the confirmation's estimate and whether a candidate still fits
    candidate     a candidate, typed (its metrics, its rollback), serialised for results.json; ranked()
    measurements  quality against the original, speed in a fresh benchmark process (a BenchResult)
    trial         building, measuring and rolling back one candidate
    loop          optimize(): the whole run, the confirmation and the written result
"""
