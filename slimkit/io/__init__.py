"""Models in and out: where a model comes from (sources), how a directory is read (files),
the load dispatcher (loader), the model handle (model), artifacts on disk (artifacts) and
the memory guard that estimates a command's peak from the files alone (resources).

The loader knows the runtimes that serve exported directories, and the kinds of modules a
saved artifact records, only through tables that higher layers register into
(`loader.register_runtime`, `artifacts.register_modules`), so nothing here imports upward.
"""
