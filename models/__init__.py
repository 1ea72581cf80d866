"""Random-weight presets: config.json files of the published Doge shapes (facts/doge-variants.md §3).

Installed as the package `doge_export.models` (see pyproject's package-dir); used as `random:<name>`.
"""
