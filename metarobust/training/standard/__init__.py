"""The robust evaluation of plain classifiers (moving to the evaluation package)."""
