"""The `paysaga` package as a type checker sees it (not installed, not imported at run time).

The install maps the top-level folders onto `paysaga.*` (`[tool.setuptools] package-dir`), and an
editable install does it with an import hook that mypy cannot follow; the relative symlinks beside
this file lay the same tree out on disk for `mypy_path = "typecheck"` (`make typecheck`).
"""
