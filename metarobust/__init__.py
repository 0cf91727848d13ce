"""metarobust: adversarially robust few-shot learning in one episodic engine.

Everything is an episode: meta-learning tasks have a support and a query set; a plain
mini-batch is a single-task episode with no support set. One engine runs
``sampler -> learner.adapt -> objective(attack) -> step`` for every recipe.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: the version in pyproject.toml, as installed
    __version__ = version("metarobust")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "robust_accuracy"]


def __getattr__(name: str):
    # Lazy, so that `import metarobust` (and `metarobust --help`) does not load torch.
    if name == "robust_accuracy":
        from metarobust.evaluation.robust import robust_accuracy

        return robust_accuracy
    raise AttributeError(f"module 'metarobust' has no attribute {name!r}")
