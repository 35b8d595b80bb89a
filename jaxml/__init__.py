"""jaxml: JAX-native functional research models and estimators."""

__version__ = "0.1.0"
