"""The version of the natten-mlx distribution (one place; ``natten_mlx.__version__`` re-exports it)."""

__version__ = "0.1.0"
