"""The shipped spaces, one module each (its docstring: what it studies, what it holds fixed)."""
