"""One runner per backend, same small interface (see base.py)."""
